"""Typed, frozen configuration for deepseek-tf.

Configuration flows one way: YAML/CLI -> these dataclasses -> `build_model`
-> layers as plain keyword arguments. Layers never see these objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BLOCK_TYPES = ("attention", "hybrid")
ATTENTION_TYPES = ("mha", "mla")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MOE_DISPATCH = ("sparse", "dense")
REMAT_MODES = ("none", "blocks")
QUANTIZE_MODES = ("none", "int8", "int4", "float8", "gptq", "awq")
QUANTIZE_INCLUDES = ("attention", "ffn", "head", "experts")
SHARE_MODES = ("none", "ffn", "attention", "both")
POSITION_TYPES = ("rope", "dynamic", "rope+dynamic")
HEAD_TYPES = ("categorical", "gaussian")
ROPE_LAYOUTS = ("half", "interleaved")
TOKENIZER_TYPES = ("char", "bpe")
PRECISIONS = ("float32", "bfloat16", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
FEDERATED_ENGINES = ("inprocess", "flower")
LOGGERS = ("tensorboard", "wandb")
OPTIMIZERS = ("adamw", "lion", "muon")


@dataclass(frozen=True)
class ModelConfig:
    # embedding / head
    vocab_size: int = 0  # 0: taken from the run's tokenizer
    d_model: int = 128  # residual width
    n_layers: int = 4
    max_seq_len: int = 256  # longest context the model (and its KV cache) accepts
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    scale_embeddings: bool = True  # embeddings times sqrt(d_model) (DeepSeek checkpoints: false)
    # attention
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (MHA); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // n_heads
    position: str = "rope"  # rope | dynamic | rope+dynamic (dynamic: learned relative bias)
    # rope
    rope_theta: float = 10000.0
    rope_layout: str = "half"  # half (rotate-half) | interleaved (pairs, DeepSeek reference)
    # yarn (active when rope_scaling_factor > 1)
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 4096  # context the rope frequencies were trained for
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    # dynamic attention (relative-distance buckets -> per-head bias)
    bias_buckets: int = 32
    bias_max_distance: int = 128
    # calls with more queries than this (training, prefill) attend one block of keys at a
    # time, in memory linear in the length (layers/blocked_attention.py); 0: never
    attention_blocked_above: int = 2048
    attention_block_size: int = 512  # keys per block
    # blocks
    blocks: tuple[str, ...] = ("attention",)  # cycled over layers: attention | hybrid
    conv_kernel_size: int = 3  # hybrid blocks: causal Conv1D width
    # feed-forward (SwiGLU)
    ffn_dim: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 32
    # attention type
    attention: str = "mha"  # mha (multi-head / grouped-query) | mla (multi-head latent)
    # mla (DeepSeek-V2/V3 multi-head latent attention)
    q_lora_rank: int = 0  # 0: plain query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512  # joint key/value compression width (cached)
    qk_nope_head_dim: int = 128  # per-head query/key features without rope
    qk_rope_head_dim: int = 64  # shared decoupled rope key width (cached)
    v_head_dim: int = 128
    mla_absorb: bool = True  # decode from the latent cache with absorbed up-projections
    # moe (DeepSeekMoE); n_routed_experts = 0 keeps every layer dense
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_ffn_dim: int = 0  # hidden width of each expert (shared experts: times their count)
    first_k_dense_replace: int = 0  # the first k layers keep a dense FFN
    moe_layer_freq: int = 1  # every n-th layer after those is MoE
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    topk_method: str = "noaux_tc"  # noaux_tc (V3: bias-corrected) | greedy | group_limited_greedy
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may use
    norm_topk_prob: bool = True  # renormalise the chosen experts' gates to sum to 1
    routed_scaling_factor: float = 1.0
    bias_update_speed: float = 0.001  # auxiliary-loss-free balancing step gamma; 0: off
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (0: none)
    moe_dispatch: str = "sparse"  # sparse (gather per expert) | dense (reference, all experts)
    # mtp (multi-token prediction)
    mtp_depth: int = 0  # D sequential MTP modules (0: none)
    mtp_loss_weight: float = 0.3  # lambda
    # parameter efficiency (the brief: share projections between neighbouring layers)
    share_adjacent: str = "none"  # none | ffn | attention | both: layers 2i and 2i+1 share it
    share_fraction: float = 0.0  # 0-1: that fraction of each adjacent pair's projections shared
    # memory
    remat: str = "none"  # none | blocks (recompute each block's activations in backward)
    # output head (uncertainty, the brief's section 8.1)
    head: str = "categorical"  # categorical | gaussian (a Gaussian over the last hidden state)
    head_samples: int = 1  # gaussian: latent samples per training step (the ELBO's estimate)
    head_kl_weight: float = 1e-3  # gaussian: weight of KL(q(z|h) || N(0, I)) per token
    # numerics / regularisation
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # how the model runs: the variables' dtype policy when a run is loaded (eval, generate,
    # serve, export), one of PRECISIONS; "": train.precision; "auto": bfloat16 where the
    # hardware multiplies it natively (a GPU/TPU, a CPU with AVX512-BF16 or AMX), else
    # float32 (faster and, at the peak, smaller on such CPUs: see
    # benchmarks/decode_kernels.py). Training uses train.precision.
    dtype: str = ""


@dataclass(frozen=True)
class CompressionConfig:
    """What `deepseek-tf compress` did to the model (written by it; empty/none for a
    trained model). Read by the builder with `model`: the compressed shape and storage."""

    layer_n_heads: tuple[int, ...] = ()  # attention heads kept per layer (mha: whole kv groups)
    layer_ffn_dims: tuple[int, ...] = ()  # dense SwiGLU width per layer (0: ffn_dim)
    layer_n_experts: tuple[int, ...] = ()  # routed experts kept per layer (0: n_routed_experts)
    lowrank: tuple[str, ...] = ()  # "LAYER/SUBLAYER/PROJ=RANK", e.g. "2/ffn/up_proj=48"
    fake_quant: bool = False  # QAT: projections train against int8-rounded weights and inputs
    quantize: str = "none"  # none | int8 | int4 | float8 | gptq | awq (weights stored quantized)
    quantize_include: tuple[str, ...] = ("attention", "ffn")  # attention, ffn, head, experts
    quantize_bits: int = 4  # gptq/awq: weight bits
    quantize_group_size: int = -1  # int4/gptq/awq: inputs per scale; -1: one per channel


@dataclass(frozen=True)
class CalibrationConfig:
    """What `deepseek-tf calibrate` fitted (1.0 for an uncalibrated model)."""

    logit_temperature: float = 1.0  # next-token logits are divided by it (`calibrate` fits it)


@dataclass(frozen=True)
class DataConfig:
    files: tuple[str, ...] = ()  # globs of UTF-8 text files; empty: the bundled corpus
    prepared: str = ""  # a `deepseek-tf data prepare` directory: stream its shards instead
    tokenizer: str = "char"  # char | bpe (trained on the files) | PATH (`tokenizer train`'s)
    vocab_size: int = 4096  # bpe only: target vocabulary size
    seq_len: int = 64  # tokens per training example
    val_fraction: float = 0.1  # tail of every file held out for validation
    seed: int = 1337
    # augmentation (the brief), all off by default
    token_replace: bool = False  # replace input tokens by random ones ...
    token_replace_prob: float = 0.05  # ... with this probability
    length_jitter: bool = False  # vary the effective sequence length ...
    length_jitter_frac: float = 0.1  # ... uniformly within +-this fraction of seq_len
    embedding_noise: bool = False  # Gaussian noise on the token embeddings ...
    embedding_noise_std: float = 0.05  # ... with this standard deviation

    def packed_length(self) -> int:
        """Tokens per training sequence: seq_len, or ceil(seq_len * (1 + frac)) with jitter."""
        if not self.length_jitter:
            return self.seq_len
        # Rounding first keeps float noise (10 * 1.1 = 11.000000000000002) from adding a token.
        return math.ceil(round(self.seq_len * (1.0 + self.length_jitter_frac), 9))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 12  # sequences per micro-batch (global, over all replicas)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # optimizer (Keras' own) + warm-up/cosine schedule
    optimizer: str = "adamw"  # adamw | lion | muon (Muon on 2-D weights, AdamW on the rest)
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    # weight averaging (DeepSeek-V3 keeps an EMA of the weights): > 0 validates, saves
    # and serves an exponential moving average of them, updated with this decay per step
    ema_decay: float = 0.0
    time_limit_minutes: float = 0.0  # stop (evaluate, checkpoint) after this wall time; 0: none
    # progressive training (config/stages.py): "steps=N[,seq_len=T][,batch_size=B]" phases
    # in order, their steps adding up to steps; one run, one optimizer, one schedule
    stages: tuple[str, ...] = ()
    # float32 | bfloat16 (bf16 variables: converted checkpoints, inference, LoRA on a frozen
    # base) | mixed_bfloat16 | mixed_float16 (float32 variables, 16-bit compute)
    precision: str = "float32"
    # lora: train low-rank adapters on a frozen base (fine-tuning `train --init-from`)
    lora_rank: int = 0  # adapter rank r; 0: train every weight
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    # attention | ffn | shared_experts | experts (routed) | a projection's name (q_b_proj, ...)
    lora_targets: tuple[str, ...] = ("attention",)
    # evaluation, checkpoints, logs
    eval_every: int = 250  # steps; 0 disables periodic validation
    eval_batches: int = 0  # 0: the whole validation split
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # save the weights of each validation that beats the best so far (RUN/best/); eval,
    # generate, export and serve then load them; checkpoints/ keep the last for --resume
    keep_best: bool = False
    log_every: int = 10
    monitor_window: int = 50  # steps in the loss-variance window
    sparsity_threshold: float = 1e-2  # |activation| below this counts as inactive
    seed: int = 1337
    # experiment tracking: tensorboard (RUN/tensorboard/) and/or wandb (the [tracking] extra)
    loggers: tuple[str, ...] = ()
    log_weights: bool = False  # wandb: upload the final checkpoint as a model artifact


@dataclass(frozen=True)
class RuntimeConfig:
    jit_compile: bool = True  # XLA; explicit because Keras' "auto" turns it off on CPU
    intra_op_threads: int = 0  # 0: TensorFlow's default (all cores)
    inter_op_threads: int = 0
    devices: tuple[str, ...] = ()  # e.g. ("/cpu:0",); empty: what TensorFlow sees
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker (TF_CONFIG) | tpu
    expert_parallel: int = 1  # shards of the routed experts over the replicas (1: none)


@dataclass(frozen=True)
class FederatedConfig:
    """`deepseek-tf federated` (the brief's section 8.2); clients train with `train.*`."""

    # clients and their data
    clients: int = 16  # clients made from the corpus
    partition: str = "by-speaker"  # iid | by-speaker | dirichlet:ALPHA | by-file
    # rounds
    rounds: int = 50
    clients_per_round: int = 0  # K sampled per round, 0: min(8, clients) (DP: Poisson, K/clients)
    local_steps: int = 10  # each sampled client's optimizer steps per round
    min_clients: int = 1  # fewest client updates for a round to count
    round_timeout: float = 600.0  # seconds to wait for the clients of a round (flower)
    eval_every: int = 5  # rounds between global validation losses (0: the last only)
    # server update
    algorithm: str = "fedavg"  # fedavg | fedprox:MU | fedadam | fedyogi
    server_learning_rate: float = 0.0  # 0: the algorithm's (fedavg/fedprox 1, fedadam/fedyogi 0.01)
    server_beta1: float = 0.9  # fedadam/fedyogi moments
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # privacy
    dp_clip: float = 0.0  # client-level DP: clip each update to this L2 norm (0: off)
    dp_noise_multiplier: float = 0.0  # noise std on the sum = multiplier * clip
    dp_delta: float = 0.0  # 0: min(1e-5, 1 / clients)
    secure_aggregation: bool = False  # pairwise-masked sums: the server sees only the sum
    secagg_threshold: int = 0  # fewest survivors of a masked round (0: half the sampled)
    secagg_frac_bits: int = 16  # fixed-point precision of masked updates
    # engine
    engine: str = "inprocess"  # inprocess (pure TensorFlow) | flower


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)


SECTIONS = {
    "model": ModelConfig,
    "compression": CompressionConfig,
    "calibration": CalibrationConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "runtime": RuntimeConfig,
    "federated": FederatedConfig,
}
