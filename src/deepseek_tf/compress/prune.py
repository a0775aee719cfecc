"""Structured pruning: `deepseek-tf compress prune RUN_DIR --out OUT`.

Whole attention heads (kv groups under GQA), dense FFN channels and routed experts are
removed by importance on a polynomial sparsity schedule during a short fine-tuning, then
the layers are physically narrowed (`layer_n_heads`, `layer_ffn_dims`, `layer_n_experts`)
so the saved model is smaller and faster, not only masked.

- Importance of a unit: `"magnitude"`, the product of the L2 norms of its input-side
  and output-side weights (times its routed-token share for experts); `"gradient"`,
  the first-order Taylor term `sum |w * dL/dw|` over its weights, accumulated over the
  pruning events; `"random"` (library only) is the baseline.
- Schedule: with `S` steps and a ramp of `R = 2S/3`, after step `s <= R` a layer has
  `round(final * (1 - (1 - s/R) ** power))` of its units removed (`final` units at the
  end of the ramp), re-scored every `R/10` steps; removed units stay removed and are
  re-zeroed after every optimiser step; the last third trains with the final masks.
  `--steps 0` prunes in one shot.
- `--unstructured` then zeroes the smallest-magnitude `sparsity` of every remaining
  block projection (same shapes).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from deepseek_tf.compress.finetune import finetune, validation_loss
from deepseek_tf.compress.prune_shrink import (
    apply_masks,
    find_groups,
    masked_update,
    prepare_routers,
    shrink,
    unstructured_prune,
)
from deepseek_tf.compress.run_io import (
    check_out_dir,
    count_parameters,
    load_source,
    progress,
    weight_bytes,
    write_run,
)
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import unbuilt_model
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.step import make_objective

TARGETS = ("heads", "ffn", "experts")
IMPORTANCE = ("magnitude", "gradient", "random")


def layer_units(config) -> list[dict]:
    """Per layer, `{kind: PrunableUnits}` of the model of `config`, from its layers' own
    declarations (an unbuilt model: no weights are allocated)."""
    model = unbuilt_model(config, config.model.vocab_size or 1)
    return [{u.kind: u for u in units} for units in model.prunable_units()]


def plan(config, sparsity: float, targets, strict: bool = True) -> dict:
    """Validates a request against `config`; returns `{(kind, layer): units kept}`.

    Raises `CompressionError` naming the option. `strict=False` (the default targets)
    drops the targets the model does not have instead of refusing them.
    """
    m = config.model
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise CompressionError(f"--targets: choose from {', '.join(TARGETS)}, got {targets}")
    if not 0.0 <= sparsity < 1.0:
        raise CompressionError(f"--sparsity: must be in [0, 1), got {sparsity}")
    if m.share_adjacent != "none":
        raise CompressionError(
            f"model.share_adjacent={m.share_adjacent}: adjacent layers share sublayers, "
            "which cannot be pruned separately"
        )
    if m.lowrank or m.quantize != "none":
        raise CompressionError(
            "prune: the model has low-rank or quantized projections; prune before lowrank/quantize"
        )
    units = layer_units(config)
    present = {kind for u in units for kind in u}
    missing = [t for t in targets if t not in present]
    if missing and strict:
        raise CompressionError(f"--targets {','.join(missing)}: the model has no such units")
    targets = [t for t in targets if t in present]
    if "experts" in targets and m.n_group > 1 and m.topk_method == "group_limited_greedy":
        raise CompressionError(
            "--targets experts: group_limited_greedy routing (V2) scores groups by their best "
            "expert; pruning keeps groups balanced for noaux_tc (V3) routing only"
        )
    keep = {}
    for i, layer in enumerate(units):
        for kind in targets:
            if kind not in layer:
                continue
            u = layer[kind]
            what = {"heads": "kv groups" if u.heads_per_unit > 1 else "heads"}.get(kind, kind)
            what = "channels" if kind == "ffn" else what
            kept = int((1.0 - sparsity) * u.n_units / u.blocks + 0.5) * u.blocks
            if kept < u.min_units:
                raise CompressionError(
                    f"--sparsity {sparsity}: layer {i} would keep {kept} of {u.n_units} "
                    f"{what} (needs at least {u.min_units}); lower --sparsity or drop "
                    f"{kind} from --targets"
                )
            keep[(kind, i)] = kept
    return keep


def check_request(config, args) -> tuple:
    """Early validation of the CLI options; returns `(targets, plan)`."""
    targets = [t for t in args.targets.split(",") if t]
    strict = set(targets) != set(TARGETS)
    if args.steps < 0:
        raise CompressionError(f"--steps: must be >= 0, got {args.steps}")
    if args.steps and args.learning_rate <= 0:
        raise CompressionError(f"--learning-rate: must be > 0, got {args.learning_rate}")
    if args.schedule_power <= 0:
        raise CompressionError(f"--schedule-power: must be > 0, got {args.schedule_power}")
    keep = plan(config, args.sparsity, targets, strict)
    return sorted({kind for kind, _ in keep}, key=TARGETS.index), keep


def removal_count(step: int, ramp: int, power: float, final: int) -> int:
    """Units removed after `step` of a `ramp`-step polynomial schedule ending at `final`."""
    fraction = 1.0 - (1.0 - min(1.0, step / ramp)) ** power
    return min(final, int(fraction * final + 0.5))


class Scorer:
    """Importance scores of every group's units (see the module docstring)."""

    def __init__(self, model, config, tokenizer, groups, mode: str, batches: int, seed: int):
        self.model, self.groups, self.mode, self.batches = model, groups, mode, batches
        self.config, self.tokenizer = config, tokenizer
        self.rng = np.random.default_rng(seed)
        self.accumulated = [np.zeros(g.n_units) for g in groups]
        self._data = None
        self._fn = None

    def _batch(self):
        if self._data is None:
            ds = make_train_dataset(self.config.data, self.tokenizer, self.config.train.batch_size)
            self._data = iter(ds)
        return next(self._data)

    def _gradient_fn(self):
        variables = [v for g in self.groups for v, _, _ in g.slices if v.trainable]
        objective = make_objective(  # the training objective, evaluated without dropout
            self.model, mtp_loss_weight=self.config.model.mtp_loss_weight
        )

        def grads(inputs, targets, weights):
            with tf.GradientTape() as tape:
                total, _ = objective(inputs, targets, weights, training=False)
            return tape.gradient(total, variables)

        return variables, tf.function(grads)

    def _load_fn(self):
        def loads(inputs):
            x, out = self.model.embed(inputs), {}
            for i, block in enumerate(self.model.blocks):
                result = block(x)
                x = result["x"]
                if "expert_load" in result:
                    out[str(i)] = result["expert_load"]  # (E,)
            return out

        return tf.function(loads)

    def __call__(self) -> list[np.ndarray]:
        if self.mode == "random":
            return [self.rng.random(g.n_units) for g in self.groups]
        if self.mode == "gradient":
            if self._fn is None:
                self._fn = self._gradient_fn()
            variables, fn = self._fn
            taylor = {id(v): 0.0 for v in variables}
            for _ in range(self.batches):
                for v, grad in zip(variables, fn(*self._batch())):
                    if grad is not None:  # IndexedSlices (gathered tables) made dense
                        grad = tf.convert_to_tensor(grad).numpy()
                        taylor[id(v)] = taylor[id(v)] + np.abs(v.numpy() * grad)
            for k, g in enumerate(self.groups):
                fresh = sum(
                    per_unit_sum(taylor[id(v)], axis, g.n_units)
                    for v, axis, _ in g.slices
                    if v.trainable
                )
                self.accumulated[k] = 0.5 * self.accumulated[k] + fresh
            return [a.copy() for a in self.accumulated]
        return self._magnitude()

    def _magnitude(self) -> list[np.ndarray]:
        loads = {}
        if any(g.router is not None for g in self.groups):
            if self._fn is None:
                self._fn = self._load_fn()
            for _ in range(self.batches):
                for key, load in self._fn(self._batch()[0]).items():
                    loads[int(key)] = loads.get(int(key), 0.0) + load.numpy()
        scores = []
        for g in self.groups:
            score = np.ones(g.n_units)
            for role in ("in", "out"):
                squares = sum(
                    per_unit_sum(v.numpy() ** 2, axis, g.n_units)
                    for v, axis, r in g.slices
                    if r == role
                )
                score = score * np.sqrt(squares)
            if g.router is not None:
                score = score * loads[g.layer]
            scores.append(score)
        return scores


def per_unit_sum(value: np.ndarray, axis: int, n_units: int) -> np.ndarray:
    """`(n_units,)` sums of `value` over each unit's slice along `axis`."""
    return np.moveaxis(value, axis, 0).reshape(n_units, -1).sum(axis=1)  # (U, rest) -> (U,)


def prune_to(groups, scores, counts) -> int:
    """Kills the lowest-scoring live units until each group has `counts[k]` dead; units
    in `blocks` (expert groups) die evenly: `counts[k] // blocks` in every block."""
    killed = 0
    for g, score, count in zip(groups, scores, counts):
        size = g.n_units // g.units.blocks
        for lo in range(0, g.n_units, size):
            alive = g.alive[lo : lo + size]  # a view: marks g.alive
            need = count // g.units.blocks - int((~alive).sum())
            if need <= 0:
                continue
            order = [u for u in np.argsort(score[lo : lo + size], kind="stable") if alive[u]]
            alive[order[:need]] = False
            killed += need
    return killed


def prune_model(
    model,
    config,
    tokenizer,
    *,
    sparsity: float,
    targets=TARGETS,
    importance: str = "gradient",
    steps: int = 0,
    learning_rate: float = 3e-4,
    schedule_power: float = 3.0,
    importance_batches: int = 2,
    seed: int = 0,
    log=print,
):
    """Prunes `model` (fine-tuned and left masked in place) into a physically smaller one.

    Args:
        model, config, tokenizer: a loaded run (see `run_io.load_source`).
        sparsity: fraction of each layer's units removed, in [0, 1).
        targets: kinds to prune (those the model lacks are skipped).
        importance: `"magnitude"`, `"gradient"` or `"random"` (baseline).
        steps: fine-tuning steps (0: one-shot pruning).
        learning_rate, schedule_power: fine-tuning lr and schedule power.
        importance_batches: training batches per importance estimate.
        seed: random-importance seed.
        log: progress printer, or None.

    Returns:
        `(new_config, new_model, info)`; `info["removed"]` lists the query heads,
        channels and experts removed per layer, `info["losses"]` the fine-tuning losses.
    """
    if importance not in IMPORTANCE:
        raise CompressionError(f"--importance: choose from {IMPORTANCE}, got {importance!r}")
    keep = plan(config, sparsity, list(targets), strict=False)
    groups = [g for g in find_groups(model, targets, keep) if g.keep < g.n_units]
    prepare_routers(groups)
    scorer = Scorer(model, config, tokenizer, groups, importance, importance_batches, seed)
    finals = [g.n_units - g.keep for g in groups]
    ramp = max(1, int(round(2 * steps / 3)))
    every = max(1, ramp // 10)
    events = []

    def prune_step(step: int) -> None:
        counts = [removal_count(step, ramp, schedule_power, f) for f in finals]
        due = step <= ramp and (step % every == 0 or step == ramp)
        if due and any(c > int((~g.alive).sum()) for g, c in zip(groups, counts)):
            killed = prune_to(groups, scorer(), counts)
            events.append({"step": step, "removed": killed})
            apply_masks(groups)  # the step keeps them applied (`masked_update`)

    losses = []
    if steps > 0 and groups:
        losses = finetune(
            model,
            config,
            tokenizer,
            steps=steps,
            learning_rate=learning_rate,
            after_update=masked_update(groups),
            on_step=prune_step,
            start_step=config.train.steps,  # continue the stream where training ended
            log=log,
        )
    if any(int((~g.alive).sum()) < f for g, f in zip(groups, finals)):  # one shot
        killed = prune_to(groups, scorer(), finals)
        events.append({"step": steps, "removed": killed})
    apply_masks(groups)
    new_config, new_model = shrink(model, config, groups)
    removed = {kind: [0] * config.model.n_layers for kind in TARGETS}
    for g in groups:
        removed[g.kind][g.layer] = int((~g.alive).sum()) * g.heads_per_unit
    if log:
        log(
            f"[prune] removed {removed}; parameters {count_parameters(model)} -> "
            f"{count_parameters(new_model)}"
        )
    info = {"removed": removed, "losses": losses, "events": events}
    return new_config, new_model, info


def run(args) -> dict:
    """`deepseek-tf compress prune`: validates, prunes, fine-tunes, shrinks, writes the run."""
    out = check_out_dir(args.run_dir, args.out)
    targets, _ = check_request(RunDir(args.run_dir).read_config(), args)
    config, model, tokenizer = load_source(args.run_dir)
    log = None if args.quiet else progress
    batches = config.train.eval_batches
    before, bytes_before = count_parameters(model), weight_bytes(model)
    loss_before = validation_loss(model, config, tokenizer, batches)
    started = time.perf_counter()
    new_config, new_model, info = prune_model(
        model,
        config,
        tokenizer,
        sparsity=args.sparsity,
        targets=targets,
        importance=args.importance,
        steps=args.steps,
        learning_rate=args.learning_rate,
        schedule_power=args.schedule_power,
        log=log,
    )
    zeroed = unstructured_prune(new_model, args.sparsity) if args.unstructured else 0
    seconds = time.perf_counter() - started
    record = {
        "method": "prune",
        "options": {
            "sparsity": args.sparsity,
            "targets": targets,
            "importance": args.importance,
            "schedule_power": args.schedule_power,
            "unstructured": bool(args.unstructured),
            "steps": args.steps,
            "learning_rate": args.learning_rate,
        },
        "parameters_before": before,
        "parameters_after": count_parameters(new_model),
        "unstructured_zeroed": zeroed,
        "val_loss_before": loss_before,
        "val_loss_after": validation_loss(new_model, new_config, tokenizer, batches),
        "removed": info["removed"],
        "bytes_before": bytes_before,
        "bytes_after": weight_bytes(new_model),
        "seconds": round(seconds, 3),
    }
    write_run(out, new_config, tokenizer, new_model, args.run_dir, record)
    return record
