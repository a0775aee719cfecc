"""Memory a model needs, estimated from its config before anything is allocated.

Absurd sizes (`d_model: 1000000000`, `train.batch_size: 1000000000`, ...) are refused up
front with the estimate, instead of an allocator failure or an out-of-memory kill minutes
later. The estimate is deliberately rough (a lower bound on what TensorFlow allocates):

- weights: the model's parameters (with the MTP modules) in the variable dtype;
- training: weights, gradients and AdamW's two moments in float32, plus activations of
  one micro-batch, about `tokens x (n_layers x (16 d_model + 3 ffn + H T) + 2 vocab)`
  values;
- one full-context KV cache for a single sequence (`model.max_seq_len` positions), which
  generation, serving and export allocate.
"""

from __future__ import annotations

import psutil

from deepseek_tf.config.loader import update_config
from deepseek_tf.config.schema import Config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import ffn_hidden_dim, unbuilt_model

FLOAT_BYTES = 4
SAMPLE_LAYERS = 64


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _described(config: Config) -> tuple[int, int]:
    """`(parameters with the MTP modules, KV-cache values per token)` from the layers' own
    declarations (an unbuilt model). Beyond `SAMPLE_LAYERS` layers, the first
    `SAMPLE_LAYERS` blocks are described and scaled (constructing a hundred thousand
    unbuilt blocks would take minutes)."""
    m, c = config.model, config.compression
    vocab = m.vocab_size or 1
    n = min(m.n_layers, SAMPLE_LAYERS)
    if n < m.n_layers:  # the first n layers
        sample = {
            "layer_n_heads": list(c.layer_n_heads[:n]),
            "layer_ffn_dims": list(c.layer_ffn_dims[:n]),
            "layer_n_experts": list(c.layer_n_experts[:n]),
            "lowrank": [e for e in c.lowrank if int(e.split("/", 1)[0]) < n],
        }
        config = update_config(config, model={"n_layers": n}, compression=sample)
    model = unbuilt_model(config, vocab)
    counts = model.parameter_counts()
    outside = counts["embedding"] + counts["head"] + m.d_model  # + final norm
    blocks = (counts["total"] - outside) * m.n_layers // n
    cache = model.cache_values_per_token() * m.n_layers // n
    return outside + blocks + counts["mtp"], cache


QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5}  # per weight, codes (scales are small)


def _weight_bytes(config: Config, params: int) -> int:
    """Float weights at `FLOAT_BYTES`; with int8/int4 codes (`compression.quantize`), all
    but the token embedding (and an untied head left out of `quantize_include`) at the
    codes' width -- an upper bound where only some projections are included."""
    c, m = config.compression, config.model
    if c.quantize not in QUANTIZED_BYTES:
        return params * FLOAT_BYTES
    table = (m.vocab_size or 1) * m.d_model
    floats = table * (1 if m.tie_embeddings or "head" in c.quantize_include else 2)
    return int(floats * FLOAT_BYTES + (params - floats) * QUANTIZED_BYTES[c.quantize])


def estimate(config: Config) -> dict[str, int]:
    """Bytes: `weights`, `training` (weights + gradients + Adam + activations) and
    `cache` (one full-context sequence)."""
    m, t, d = config.model, config.train, config.data
    params, cache_per_token = _described(config)
    tokens = t.batch_size * d.packed_length()
    per_token = m.n_layers * (
        16 * m.d_model + 3 * ffn_hidden_dim(m) + m.n_heads * d.packed_length()
    )
    activations = tokens * (per_token + 2 * (m.vocab_size or 1))
    return {
        "parameters": params,
        "weights": _weight_bytes(config, params),
        "training": params * 4 * FLOAT_BYTES + activations * FLOAT_BYTES,
        "activations": activations * FLOAT_BYTES,
        "cache": m.max_seq_len * cache_per_token * FLOAT_BYTES,
    }


def check_fits(config: Config, purpose: str, available: int | None = None) -> None:
    """Raises a one-line `ConfigError` when `purpose` (`"train"` or `"inference"`) needs
    more memory than the machine has (`available` bytes; default: its physical memory)."""
    available = available or psutil.virtual_memory().total
    est = estimate(config)
    m = config.model
    parts = {"cache": est["cache"]}
    if purpose == "train":
        parts["training"] = est["training"]
    else:
        parts["weights"] = est["weights"]
    need = sum(parts.values())
    if need <= available:
        return
    if purpose == "train" and est["activations"] > est["cache"] + est["weights"] * 4:
        culprit = (
            f"train.batch_size={config.train.batch_size} x data.seq_len="
            f"{config.data.seq_len}: one step's activations need ~{_human(est['activations'])}"
        )
    elif est["cache"] >= max(parts.values()):
        culprit = (
            f"model.max_seq_len={m.max_seq_len}: one sequence's full-context KV cache needs "
            f"~{_human(est['cache'])}"
        )
    else:
        culprit = (
            f"the model's {est['parameters']:,} parameters (model.d_model={m.d_model}, "
            f"model.n_layers={m.n_layers}, model.vocab_size={m.vocab_size}) need "
            f"~{_human(est['weights'])} for the weights alone"
        )
    raise ConfigError(
        f"{culprit}; {purpose} needs ~{_human(need)} in all, more than this machine's "
        f"{_human(available)} of memory"
    )
