"""Low-rank factorisation: projections replaced by two truncated-SVD factors.

`deepseek-tf compress lowrank RUN --out OUT [--rank R | --energy E] [--targets ffn]`
factorises every chosen projection `W (in, out) ~= U_r diag(S_r) V_r^T` into
`down = U_r sqrt(S_r)` `(in, r)` and `up = sqrt(S_r) V_r^T` `(r, out)` (a `LowRankDense`),
with `r` fixed or the smallest rank keeping a fraction `E` of the squared singular values.
A projection is only factorised when `r (in + out) < in * out` (it saves parameters);
the others are skipped and recorded. The result is config-driven (`compression.lowrank`
entries), so the new run loads like any other; an optional fine-tune recovers quality.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from deepseek_tf.compress.finetune import finetune
from deepseek_tf.compress.job import Plan, Result, check_float, check_int, comma_list, run_job
from deepseek_tf.compress.run_io import Log, Source
from deepseek_tf.config.loader import update_config
from deepseek_tf.errors import CompressionError
from deepseek_tf.layers.low_rank_dense import LowRankDense
from deepseek_tf.models.builder import build_model

TARGETS = ("attention", "ffn")
SHARED = {"attention": ("attention", "both"), "ffn": ("ffn", "both")}


def parse_targets(targets) -> tuple[str, ...]:
    """`"attention,ffn"` (or a sequence) -> checked tuple of sublayer names."""
    names = comma_list("targets", targets)
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise CompressionError(f"--targets: {bad or targets!r} not in {', '.join(TARGETS)}")
    return names


def check_options(config, targets, rank, energy) -> None:
    """Config-level refusals, before any weight is read."""
    if rank is not None and rank < 1:
        raise CompressionError(f"--rank: must be >= 1, got {rank}")
    if rank is None and not (energy is not None and 0.0 < energy <= 1.0):
        raise CompressionError(f"--energy: must be in (0, 1], got {energy}")
    m, quantized = config.model, config.compression.quantize
    if quantized != "none":
        raise CompressionError(
            f"compression.quantize={quantized}: quantized weights cannot be factorised; "
            "factorise the float run, then quantize"
        )
    if m.share_fraction:
        raise CompressionError(
            f"model.share_fraction={m.share_fraction}: adjacent layers share projections; "
            "cannot factorise shared projections"
        )
    for target in targets:
        if m.share_adjacent in SHARED[target]:
            raise CompressionError(
                f"--targets {target}: shared between adjacent layers "
                f"(model.share_adjacent={m.share_adjacent}); cannot factorise shared projections"
            )


def candidates(model, targets) -> tuple[dict, list[dict]]:
    """`({"LAYER/SUBLAYER/PROJ": Dense}, skipped)`: the chosen sublayers' projections their
    layers declare factorisable (MLA's `kv_b_proj` is not: absorbed decoding folds it; nor
    is a MoE feed-forward)."""
    found, skipped = {}, []
    for i, block in enumerate(model.blocks):
        if "ffn" in targets and model.moe_layers[i]:
            skipped.append({"projection": f"{i}/ffn", "reason": "MoE feed-forward"})
        for key, declared, layer in block.projection_layers():
            if key.split("/")[0] not in targets or not declared.factorizable:
                continue
            if isinstance(layer, LowRankDense):
                skipped.append({"projection": f"{i}/{key}", "reason": "already low-rank"})
                continue
            found[f"{i}/{key}"] = layer
    return found, skipped


def check_rank(found: dict, rank: int | None) -> None:
    """A fixed rank must not exceed `min(in, out)` of any chosen projection."""
    for key, layer in found.items():
        n_in, n_out = layer.kernel.shape
        if rank is not None and rank > min(n_in, n_out):
            raise CompressionError(
                f"--rank {rank}: exceeds min(in, out)={min(n_in, n_out)} of {key} ({n_in}x{n_out})"
            )


def choose_rank(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    """Fixed `rank`, or the smallest rank whose squared singular values reach `energy`."""
    if rank is not None:
        return rank
    power = s.astype(np.float64) ** 2  # (k,)
    total = power.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(power) / total
    return int(min(np.searchsorted(kept, energy * (1 - 1e-12)) + 1, len(s)))


def factorize(model, config, *, targets=("ffn",), rank: int | None = None, energy=None):
    """Replaces the projections of `targets` by truncated-SVD factor pairs.

    Args:
        model: the trained `CausalLM` (not modified).
        config: its config.
        targets: sublayers to factorise: "attention", "ffn" (a tuple or a comma list).
        rank: fixed rank of every factorised projection, or None to use `energy`.
        energy: fraction in (0, 1] of the squared singular values each projection keeps.

    Returns:
        `(new_config, new_model, info)`: the config with `compression.lowrank` entries, a model
        with every weight copied and the factors filled, and `{"ranks": {...},
        "skipped": [...], "energy_kept": {...}}`.
    """
    targets = parse_targets(targets)
    check_options(config, targets, rank, energy)
    found, skipped = candidates(model, targets)
    check_rank(found, rank)
    ranks, factors, kept = {}, {}, {}
    for key, layer in found.items():
        w = tf.cast(layer.kernel, tf.float64)  # (in, out)
        n_in, n_out = w.shape
        s, u, v = tf.linalg.svd(w)  # (k,), (in, k), (out, k): w = u diag(s) v^T
        s, u, v = s.numpy(), u.numpy(), v.numpy()
        r = choose_rank(s, rank, energy)
        if r * (n_in + n_out) >= n_in * n_out:
            reason = f"rank {r} saves no parameters ({n_in}x{n_out})"
            skipped.append({"projection": key, "reason": reason})
            continue
        root = np.sqrt(s[:r])  # (r,)
        factors[key] = (u[:, :r] * root, root[:, None] * v[:, :r].T)  # (in, r), (r, out)
        ranks[key] = r
        kept[key] = round(float((s[:r] ** 2).sum() / max((s**2).sum(), 1e-300)), 6)
    entries = tuple(config.compression.lowrank) + tuple(f"{k}={r}" for k, r in ranks.items())
    new_config = update_config(config, compression={"lowrank": entries})
    new_model = build_model(new_config, model.vocab_size)
    _copy_weights(model, new_model, factors)
    return new_config, new_model, {"ranks": ranks, "skipped": skipped, "energy_kept": kept}


def _copy_weights(source, target, factors: dict) -> None:
    """Copies every weight by path (model name stripped), then fills the factor pairs."""
    by_path = {v.path.split("/", 1)[1]: v for v in source.weights}
    filled = set()
    for key, (down, up) in factors.items():
        layer_index, sublayer, name = key.split("/")
        block = target.blocks[int(layer_index)]
        pair = getattr(block.attention if sublayer == "attention" else block.ffn, name)
        for var, value in ((pair.down.kernel, down), (pair.up.kernel, up)):
            var.assign(value.astype(var.dtype))
            filled.add(id(var))
    for var in target.weights:
        if id(var) in filled:
            continue
        src = by_path.get(var.path.split("/", 1)[1])
        if src is None or tuple(src.shape) != tuple(var.shape):
            raise RuntimeError(f"low-rank copy: no source weight for {var.path} {var.shape}")
        var.assign(src)


DEFAULT_ENERGY = 0.9


def lowrank(
    run_dir,
    *,
    out,
    rank: int | None = None,
    energy: float | None = None,
    targets: str | tuple[str, ...] = "ffn",
    steps: int = 0,
    learning_rate: float = 1e-4,
    quiet: bool = False,
) -> dict:
    """Factorises a trained run's projections into truncated-SVD pairs, optionally
    fine-tunes, and writes a new run (`deepseek-tf compress lowrank`).

    Args:
        run_dir: the trained (float) run.
        out: the new run directory.
        rank: fixed rank of every factorised projection (not with `energy`).
        energy: smallest rank keeping this fraction in (0, 1] of the squared singular
            values (None and no `rank`: 0.9).
        targets: comma list or sequence of "attention", "ffn".
        steps: fine-tuning steps after factorising (0: none).
        learning_rate: peak fine-tuning learning rate (> 0 when `steps`).
        quiet: no progress lines.

    Returns:
        The record (`compress.job`), with `options` {rank, energy, targets, steps,
        learning_rate}, `ranks` ({"LAYER/SUBLAYER/PROJ": rank}), `skipped` (projections
        left whole, with the reason) and `energy_kept` per factorised projection.

    Raises:
        CompressionError: an option out of range, or projections that cannot take the
            rank (before any work).

    Examples:
        >>> from deepseek_tf import compress
        >>> compress.lowrank("runs/tiny", out="runs/tiny-lr", energy=0.9)  # doctest: +SKIP
    """
    names = parse_targets(targets)
    if rank is not None and energy is not None:
        raise CompressionError("give one of --rank and --energy")
    rank = check_int("rank", rank, optional=True)
    energy = check_float("energy", energy, optional=True)
    if rank is None and energy is None:
        energy = DEFAULT_ENERGY
    check_int("steps", steps, minimum=0)
    if check_float("learning_rate", learning_rate) <= 0 and steps:
        raise CompressionError(f"--learning-rate: must be > 0, got {learning_rate}")
    options = {"rank": rank, "energy": energy, "targets": list(names), "steps": steps}
    options["learning_rate"] = learning_rate

    def plan_for(config) -> Plan:
        check_options(config, names, rank, energy)
        transform = functools.partial(
            _factorized, targets=names, rank=rank, energy=energy, steps=steps, lr=learning_rate
        )
        return Plan(
            "lowrank",
            options,
            transform,
            check_loaded=lambda source: check_rank(candidates(source.model, names)[0], rank),
        )

    return run_job(run_dir, out, plan_for, quiet=quiet)


def _factorized(source: Source, log: Log, *, targets, rank, energy, steps, lr) -> Result:
    """The factorised (and fine-tuned) config and model of `source` (the job's transform)."""
    new_config, new_model, info = factorize(
        source.model, source.config, targets=targets, rank=rank, energy=energy
    )
    if steps > 0:
        finetune(
            new_model,
            new_config,
            source.tokenizer,
            steps=steps,
            learning_rate=lr,
            start_step=source.config.train.steps,  # continue the stream where training ended
            log=log,
        )
    return Result(new_config, new_model, info)
