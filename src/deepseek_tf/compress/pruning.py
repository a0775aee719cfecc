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

import functools

import numpy as np

from deepseek_tf.compress.finetune import finetune
from deepseek_tf.compress.job import (
    Plan,
    Result,
    check_choice,
    check_float,
    check_int,
    comma_list,
    run_job,
)
from deepseek_tf.compress.prune_importance import IMPORTANCE, Scorer
from deepseek_tf.compress.prune_shrink import (
    apply_masks,
    find_groups,
    masked_update,
    prepare_routers,
    shrink,
    unstructured_prune,
)
from deepseek_tf.compress.run_io import Log, Source, count_parameters
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import unbuilt_model

TARGETS = ("heads", "ffn", "experts")
CLI_IMPORTANCE = ("magnitude", "gradient")  # "random" is the library-only baseline


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
    if m.share_adjacent != "none" or m.share_fraction:
        raise CompressionError(
            f"model.share_adjacent={m.share_adjacent}, model.share_fraction={m.share_fraction}: "
            "adjacent layers share weights, which cannot be pruned separately"
        )
    if config.compression.lowrank or config.compression.quantize != "none":
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


def check_options(*, sparsity, steps, learning_rate, schedule_power) -> float:
    """Type and range checks of `prune`'s numeric options; returns `sparsity` as a float."""
    sparsity = check_float("sparsity", sparsity)
    check_int("steps", steps, minimum=0)
    if check_float("learning_rate", learning_rate) <= 0 and steps:
        raise CompressionError(f"--learning-rate: must be > 0, got {learning_rate}")
    if check_float("schedule_power", schedule_power) <= 0:
        raise CompressionError(f"--schedule-power: must be > 0, got {schedule_power}")
    return sparsity


def check_request(config, targets, sparsity: float) -> list[str]:
    """The targets `config` will have pruned (validated against it, see `plan`): the
    default `TARGETS` drop the kinds the model lacks, an explicit list must all exist."""
    keep = plan(config, sparsity, list(targets), strict=set(targets) != set(TARGETS))
    return sorted({kind for kind, _ in keep}, key=TARGETS.index)


def removal_count(step: int, ramp: int, power: float, final: int) -> int:
    """Units removed after `step` of a `ramp`-step polynomial schedule ending at `final`."""
    fraction = 1.0 - (1.0 - min(1.0, step / ramp)) ** power
    return min(final, int(fraction * final + 0.5))


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
        model, config, tokenizer: a loaded run (see `run_io.load_source`); `model` is
            left masked (pruned units zeroed) in place.
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


def prune(
    run_dir,
    *,
    out,
    sparsity: float = 0.3,
    targets: str | tuple[str, ...] = "heads,ffn,experts",
    importance: str = "gradient",
    schedule_power: float = 3.0,
    unstructured: bool = False,
    steps: int = 300,
    learning_rate: float = 3e-4,
    quiet: bool = False,
) -> dict:
    """Structured pruning of a trained run into a physically smaller new run
    (`deepseek-tf compress prune`; see the module docstring).

    Args:
        run_dir: the trained run.
        out: the new run directory.
        sparsity: fraction of each target's units removed, in [0, 1).
        targets: comma list or sequence of "heads", "ffn", "experts" (the default drops
            the kinds the model lacks; an explicit kind it lacks is an error).
        importance: "gradient" or "magnitude".
        schedule_power: power of the polynomial sparsity schedule (> 0).
        unstructured: also zero the smallest `sparsity` of every remaining projection.
        steps: fine-tuning steps (0: prune in one shot).
        learning_rate: peak fine-tuning learning rate (> 0 when `steps`).
        quiet: no progress lines.

    Returns:
        The record (`compress.job`), with `options` (as given, targets resolved),
        `removed` (per kind, per layer: query heads, channels, experts removed) and
        `unstructured_zeroed`.

    Raises:
        CompressionError: an option out of range or a request the model cannot take
            (before any work).

    Examples:
        >>> from deepseek_tf import compress
        >>> compress.prune("runs/tiny", out="runs/tiny-p30", sparsity=0.3)  # doctest: +SKIP
    """
    sparsity = check_options(
        sparsity=sparsity, steps=steps, learning_rate=learning_rate, schedule_power=schedule_power
    )
    check_choice("importance", importance, CLI_IMPORTANCE)
    asked = comma_list("targets", targets)
    options = {"sparsity": sparsity, "importance": importance, "schedule_power": schedule_power}
    options.update(unstructured=bool(unstructured), steps=steps, learning_rate=learning_rate)

    def plan_for(config) -> Plan:
        chosen = check_request(config, asked, sparsity)
        transform = functools.partial(_pruned, targets=chosen, **options)
        return Plan("prune", {"targets": chosen, **options}, transform)

    return run_job(run_dir, out, plan_for, quiet=quiet)


def _pruned(source: Source, log: Log, *, targets, unstructured: bool, **options) -> Result:
    """The pruned, shrunk config and model of `source` (the job's transform)."""
    new_config, new_model, info = prune_model(
        source.model, source.config, source.tokenizer, targets=targets, log=log, **options
    )
    zeroed = unstructured_prune(new_model, options["sparsity"]) if unstructured else 0
    return Result(
        new_config, new_model, {"removed": info["removed"], "unstructured_zeroed": zeroed}
    )
