"""Validation of a resolved `Config`: ranges, choices, cross-field consistency, and keys
the model never reads. Every failure is a `ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from deepseek_tf.config.schema import (
    ATTENTION_TYPES,
    BLOCK_TYPES,
    FEDERATED_ENGINES,
    HEAD_TYPES,
    LOGGERS,
    MOE_DISPATCH,
    OPTIMIZERS,
    POSITION_TYPES,
    PRECISIONS,
    QUANTIZE_INCLUDES,
    QUANTIZE_MODES,
    REMAT_MODES,
    ROPE_LAYOUTS,
    SCORING_FUNCS,
    SECTIONS,
    SHARE_MODES,
    STRATEGIES,
    TOKENIZER_TYPES,
    TOPK_METHODS,
    Config,
)
from deepseek_tf.config.stages import parse_stages
from deepseek_tf.errors import ConfigError


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(section: Any, prefix: str, names: Iterable[str], allow_zero=False) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{prefix}.{name}: must be {bound}, got {value}")


def validate(config: Config, explicit: Iterable[str] = ()) -> None:
    """Cross-field checks; raises `ConfigError` naming the key. `explicit`: see
    `config_from_dict`."""
    m, d, t, r = config.model, config.data, config.train, config.runtime
    explicit = set(explicit)
    _check_positive(m, "model", ("d_model", "n_layers", "n_heads", "max_seq_len", "rope_theta"))
    _check_positive(m, "model", ("vocab_size", "n_kv_heads", "head_dim", "ffn_dim"), True)
    _check_choice("model.position", m.position, POSITION_TYPES)
    _check_choice("model.rope_layout", m.rope_layout, ROPE_LAYOUTS)
    if not m.blocks:
        raise ConfigError("model.blocks: needs at least one block type")
    for i, b in enumerate(m.blocks):
        _check_choice(f"model.blocks[{i}]", b, BLOCK_TYPES)
    if m.attention == "mha":  # mla sizes its heads with its own keys
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % kv:
            raise ConfigError(f"model.n_kv_heads: {kv} does not divide model.n_heads={m.n_heads}")
        if not m.head_dim and m.d_model % m.n_heads:
            raise ConfigError(f"model.d_model: {m.d_model} is not divisible by n_heads={m.n_heads}")
        head_dim = m.head_dim or m.d_model // m.n_heads
        if "rope" in m.position and head_dim % 2:
            raise ConfigError(f"model.head_dim: rope needs an even head size, got {head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.rope_scaling_factor < 1.0:
        raise ConfigError(f"model.rope_scaling_factor: must be >= 1, got {m.rope_scaling_factor}")
    _check_positive(
        m,
        "model",
        ("conv_kernel_size", "bias_buckets", "bias_max_distance", "attention_block_size"),
    )
    _check_positive(m, "model", ("attention_blocked_above",), allow_zero=True)  # 0: never
    _check_positive(d, "data", ("seq_len", "vocab_size"))
    _validate_mla_moe_mtp(m, d)
    _refuse_unused(config, explicit)
    _validate_compression(m, config.compression)
    _check_choice("model.remat", m.remat, REMAT_MODES)
    _check_choice("model.head", m.head, HEAD_TYPES)
    _check_positive(m, "model", ("head_samples",))
    _check_positive(config.calibration, "calibration", ("logit_temperature",))
    if m.dtype:  # "": train.precision
        _check_choice("model.dtype", m.dtype, (*PRECISIONS, "auto"))
    _check_positive(m, "model", ("head_kl_weight",), True)
    _check_choice("model.share_adjacent", m.share_adjacent, SHARE_MODES)
    if not 0.0 <= m.share_fraction <= 1.0:
        raise ConfigError(f"model.share_fraction: must be in [0, 1], got {m.share_fraction}")
    if m.share_fraction and m.share_adjacent != "none":
        raise ConfigError(
            "model.share_fraction: give it or model.share_adjacent (whole sublayers), not both"
        )
    if d.prepared and d.files:
        raise ConfigError(
            "data.prepared: the prepared directory is the training text; leave data.files empty"
        )
    if not d.tokenizer.strip():  # anything but char/bpe names a tokenizer file or directory
        raise ConfigError(f"data.tokenizer: empty; expected one of {TOKENIZER_TYPES} or a path")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    if not 0.0 <= d.token_replace_prob <= 1.0:
        raise ConfigError(f"data.token_replace_prob: must be in [0, 1], got {d.token_replace_prob}")
    if not 0.0 <= d.length_jitter_frac < 1.0:
        raise ConfigError(f"data.length_jitter_frac: must be in [0, 1), got {d.length_jitter_frac}")
    if d.embedding_noise_std < 0:
        raise ConfigError(f"data.embedding_noise_std: must be >= 0, got {d.embedding_noise_std}")
    packed = d.packed_length()
    if packed > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len: training sequences of {packed} tokens exceed "
            f"model.max_seq_len={m.max_seq_len}"
        )
    _check_positive(t, "train", ("steps", "batch_size", "gradient_accumulation_steps"))
    _check_positive(t, "train", ("learning_rate", "log_every", "monitor_window"))
    _check_positive(t, "train", ("warmup_steps", "weight_decay", "clip_norm", "eval_every"), True)
    _check_positive(t, "train", ("eval_batches", "checkpoint_every", "min_learning_rate"), True)
    _check_positive(t, "train", ("keep_checkpoints",))
    if t.keep_best and not t.eval_every and "train.keep_best" in explicit:  # a preset's: inert
        raise ConfigError(
            "train.keep_best: keeps the best validation's weights, but train.eval_every=0 "
            "runs no validation; set train.eval_every > 0 or train.keep_best=false"
        )
    _check_positive(t, "train", ("time_limit_minutes",), True)
    parse_stages(t, d, m.max_seq_len)  # each stage names its fault
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0: off), got {t.ema_decay}")
    if t.ema_decay and t.precision == "bfloat16":
        raise ConfigError(
            "train.ema_decay: a moving average of bfloat16 variables loses its updates to "
            "rounding; use train.precision mixed_bfloat16 (float32 variables)"
        )
    _check_choice("train.precision", t.precision, PRECISIONS)
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_positive(t, "train", ("lora_rank",), True)
    _check_positive(t, "train", ("lora_alpha",))
    if t.lora_rank and not t.lora_targets:
        raise ConfigError("train.lora_targets: empty; name what the adapters train")
    if t.lora_rank and config.compression.fake_quant:
        raise ConfigError(
            "train.lora_rank: adapters do not combine with compression.fake_quant (QAT)"
        )
    for name in t.loggers:
        _check_choice("train.loggers", name, LOGGERS)
    if t.log_weights and "wandb" not in t.loggers:
        raise ConfigError(
            "train.log_weights: uploads to Weights & Biases; add wandb to train.loggers"
        )
    _check_choice("runtime.strategy", r.strategy, STRATEGIES)
    _validate_federated(config.federated)
    _check_positive(r, "runtime", ("intra_op_threads", "inter_op_threads"), True)
    _validate_expert_parallel(config)


def _validate_expert_parallel(config: Config) -> None:
    """`runtime.expert_parallel`: what the model and training options allow (the replicas
    are checked by the trainer, which knows them)."""
    m, c, t = config.model, config.compression, config.train
    n = config.runtime.expert_parallel
    _check_positive(config.runtime, "runtime", ("expert_parallel",))
    if n == 1:
        return
    if not m.n_routed_experts:
        raise ConfigError("runtime.expert_parallel: the model has no routed experts to shard")
    for experts in {m.n_routed_experts, *(e for e in c.layer_n_experts if e)}:
        if experts % n:
            raise ConfigError(
                f"runtime.expert_parallel: {n} does not divide the {experts} routed experts"
            )
    if "experts" in c.quantize_include and c.quantize != "none":
        raise ConfigError("runtime.expert_parallel: quantized experts are not sharded")
    if t.lora_rank and "experts" in t.lora_targets:
        raise ConfigError("runtime.expert_parallel: LoRA on the routed experts is not sharded")
    if t.precision == "mixed_float16":
        raise ConfigError(
            "runtime.expert_parallel: mixed_float16's loss scaling is not wired for sharded "
            "experts; use mixed_bfloat16 or float32"
        )
    if t.ema_decay:
        raise ConfigError("runtime.expert_parallel: train.ema_decay does not average expert shards")


def _validate_mla_moe_mtp(m, d) -> None:
    _check_choice("model.attention", m.attention, ATTENTION_TYPES)
    if m.attention == "mla":
        _check_positive(m, "model", ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"))
        _check_positive(m, "model", ("q_lora_rank", "qk_nope_head_dim"), True)
        if m.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim: must be even, got {m.qk_rope_head_dim}")
        if m.position != "rope":
            raise ConfigError(f"model.position: mla uses decoupled rope only, got {m.position!r}")
    if m.n_routed_experts:
        e, k = m.n_routed_experts, m.num_experts_per_tok
        _check_positive(m, "model", ("moe_ffn_dim", "moe_layer_freq", "n_group", "topk_group"))
        _check_positive(m, "model", ("n_shared_experts", "first_k_dense_replace"), True)
        _check_positive(m, "model", ("bias_update_speed", "seq_aux_loss_alpha"), True)
        _check_positive(m, "model", ("routed_scaling_factor",))
        _check_choice("model.scoring_func", m.scoring_func, SCORING_FUNCS)
        _check_choice("model.topk_method", m.topk_method, TOPK_METHODS)
        _check_choice("model.moe_dispatch", m.moe_dispatch, MOE_DISPATCH)
        if not 1 <= k <= e:
            raise ConfigError(
                f"model.num_experts_per_tok: {k} must be in [1, n_routed_experts={e}]"
            )
        if e % m.n_group:
            raise ConfigError(f"model.n_group: {m.n_group} does not divide n_routed_experts={e}")
        if m.topk_group > m.n_group:
            raise ConfigError(f"model.topk_group: {m.topk_group} exceeds n_group={m.n_group}")
        if k > m.topk_group * (e // m.n_group):
            raise ConfigError(
                f"model.num_experts_per_tok: {k} experts cannot come from topk_group="
                f"{m.topk_group} groups of {e // m.n_group}"
            )
        if m.topk_method == "noaux_tc" and m.n_group > 1 and e // m.n_group < 2:
            raise ConfigError("model.n_group: noaux_tc scores groups by their top-2 experts")
    _check_positive(m, "model", ("mtp_depth", "mtp_loss_weight"), True)
    if m.mtp_depth >= d.seq_len:
        raise ConfigError(f"model.mtp_depth: {m.mtp_depth} must be below data.seq_len")


# Model keys only some layer types read: (key, used when, what uses it). A value the user
# sets where nothing reads it is refused rather than silently ignored.
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MOE_KEYS = (
    "n_shared_experts", "num_experts_per_tok", "moe_ffn_dim", "first_k_dense_replace",
    "moe_layer_freq", "scoring_func", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "routed_scaling_factor", "bias_update_speed", "seq_aux_loss_alpha",
    "moe_dispatch",
)  # fmt: skip
_USED_WHEN = (
    *((f"model.{k}", lambda c: c.model.attention == "mla", "model.attention: mla")
      for k in (*_MLA_KEYS, "mla_absorb")),
    *((f"model.{k}", lambda c: c.model.attention == "mha", "model.attention: mha")
      for k in ("n_kv_heads", "head_dim")),
    *((f"model.{k}", lambda c: c.model.n_routed_experts > 0, "model.n_routed_experts > 0")
      for k in _MOE_KEYS),
    *((f"model.{k}", lambda c: "dynamic" in c.model.position,
       "model.position: dynamic or rope+dynamic") for k in ("bias_buckets", "bias_max_distance")),
    ("model.conv_kernel_size", lambda c: "hybrid" in c.model.blocks, "a hybrid block"),
    ("model.mtp_loss_weight", lambda c: c.model.mtp_depth > 0, "model.mtp_depth > 0"),
    ("data.vocab_size", lambda c: c.data.tokenizer == "bpe", "data.tokenizer: bpe"),
    *((f"model.{k}", lambda c: c.model.head == "gaussian", "model.head: gaussian")
      for k in ("head_samples", "head_kl_weight")),
)  # fmt: skip


def _refuse_unused(config, explicit: set[str]) -> None:
    """A key the user set (away from its default) that this model's layer types (or its
    tokenizer) never read: refused rather than silently ignored."""
    for key, used, when in _USED_WHEN:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        default = getattr(SECTIONS[section](), name)
        if key in explicit and value != default and not used(config):
            raise ConfigError(
                f"{key}: set to {value!r}, but only read with {when}; remove it or change the model"
            )


def parse_lowrank(entries, n_layers: int) -> list[dict]:
    """`compression.lowrank` entries `"LAYER/SUBLAYER/PROJ=RANK"` -> `{name: rank}` per layer."""
    ranks = [{} for _ in range(n_layers)]
    for entry in entries:
        path, _, rank = entry.partition("=")
        layer, _, name = path.partition("/")
        sublayer = name.partition("/")[0]
        if not (layer.isdigit() and sublayer in ("attention", "ffn") and rank.isdigit()):
            raise ConfigError(
                f"compression.lowrank: {entry!r} is not LAYER/attention|ffn/PROJECTION=RANK"
            )
        if not (int(layer) < n_layers and int(rank) > 0):
            raise ConfigError(f"compression.lowrank: {entry!r}: layer or rank out of range")
        ranks[int(layer)][name] = int(rank)
    return ranks


def _validate_compression(m, c) -> None:
    """The `compression` section `c` against the architecture `m` it compressed."""
    _check_choice("compression.quantize", c.quantize, QUANTIZE_MODES)
    if c.quantize_bits not in (2, 3, 4, 8):
        raise ConfigError(f"compression.quantize_bits: must be 2, 3, 4 or 8, got {c.quantize_bits}")
    if c.quantize_group_size == 0 or c.quantize_group_size < -1:
        raise ConfigError(
            f"compression.quantize_group_size: -1 or positive, got {c.quantize_group_size}"
        )
    for i, part in enumerate(c.quantize_include):
        _check_choice(f"compression.quantize_include[{i}]", part, QUANTIZE_INCLUDES)
    if "experts" in c.quantize_include and c.quantize not in ("int8", "int4"):
        raise ConfigError(
            f"compression.quantize_include: routed experts are quantized by int8 or int4 only, "
            f"not {c.quantize}"
        )
    if "head" in c.quantize_include and m.tie_embeddings:
        raise ConfigError(
            "compression.quantize_include: a tied output head is the embedding (float)"
        )
    if c.fake_quant and c.quantize != "none":
        raise ConfigError("compression.fake_quant: a quantized model has no float weights to train")
    for key in ("layer_n_heads", "layer_ffn_dims", "layer_n_experts"):
        values = getattr(c, key)
        if values and len(values) != m.n_layers:
            raise ConfigError(
                f"compression.{key}: needs model.n_layers={m.n_layers} entries, got {len(values)}"
            )
        if any(v < 0 for v in values):
            raise ConfigError(f"compression.{key}: entries must be >= 0, got {list(values)}")
    kv = m.n_kv_heads or m.n_heads
    for i, h in enumerate(c.layer_n_heads):
        if h > m.n_heads or (m.attention == "mha" and h % (m.n_heads // kv)):
            raise ConfigError(
                f"compression.layer_n_heads[{i}]: {h} heads is not whole kv groups of "
                f"{m.n_heads // kv} within model.n_heads={m.n_heads}"
            )
    for i, e in enumerate(c.layer_n_experts):
        if e and not m.num_experts_per_tok <= e <= m.n_routed_experts:
            raise ConfigError(
                f"compression.layer_n_experts[{i}]: {e} must be in [model.num_experts_per_tok="
                f"{m.num_experts_per_tok}, model.n_routed_experts={m.n_routed_experts}]"
            )
        if e and e != m.n_routed_experts and m.n_group > 1 and e % m.n_group:
            raise ConfigError(
                f"compression.layer_n_experts[{i}]: {e} experts do not split into model.n_group="
                f"{m.n_group} equal groups"
            )
    parse_lowrank(c.lowrank, m.n_layers)


DEFAULT_CLIENTS_PER_ROUND = 8  # federated.clients_per_round 0: this many, or every client


def clients_per_round(f) -> int:
    """The clients sampled per round, `K`: `federated.clients_per_round`, or (0, the
    default) `min(8, federated.clients)`, so a run with few clients asks all of them.
    With DP, clients are Poisson-sampled with probability `K / clients` (at most 1).

    Examples:

    >>> from deepseek_tf.config.schema import FederatedConfig
    >>> clients_per_round(FederatedConfig(clients=4)), clients_per_round(FederatedConfig())
    (4, 8)
    """
    return f.clients_per_round or min(DEFAULT_CLIENTS_PER_ROUND, f.clients)


def _validate_federated(f) -> None:
    """Ranges of the federated section (the partition and algorithm specs are parsed by
    `deepseek_tf.federated`, which names them as CLI options)."""
    _check_positive(f, "federated", ("clients", "rounds", "local_steps"))
    _check_positive(f, "federated", ("min_clients", "round_timeout", "secagg_frac_bits"))
    _check_positive(f, "federated", ("clients_per_round", "server_learning_rate"), True)
    _check_positive(f, "federated", ("eval_every", "secagg_threshold", "server_tau"), True)
    _check_positive(f, "federated", ("dp_clip", "dp_noise_multiplier", "dp_delta"), True)
    _check_choice("federated.engine", f.engine, FEDERATED_ENGINES)
    if f.clients_per_round > f.clients:
        raise ConfigError(
            f"federated.clients_per_round: {f.clients_per_round} is more than the "
            f"{f.clients} clients (federated.clients; 0 samples min(8, clients))"
        )
    if f.min_clients > clients_per_round(f):
        raise ConfigError(
            f"federated.min_clients: {f.min_clients} exceeds the {clients_per_round(f)} "
            "clients sampled per round (federated.clients_per_round)"
        )
    for name in ("server_beta1", "server_beta2"):
        if not 0.0 <= getattr(f, name) < 1.0:
            raise ConfigError(f"federated.{name}: must be in [0, 1), got {getattr(f, name)}")
    if not 1 <= f.secagg_frac_bits <= 24:
        raise ConfigError(
            f"federated.secagg_frac_bits: must be in [1, 24], got {f.secagg_frac_bits}"
        )
