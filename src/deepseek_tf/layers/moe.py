"""DeepSeekMoE: shared experts plus top-k routed SwiGLU experts with dropless dispatch."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from deepseek_tf.layers import expert_quant, moe_tiles
from deepseek_tf.layers.expert_parallel import expert_parallel_dispatch
from deepseek_tf.layers.expert_shards import in_replicas
from deepseek_tf.layers.expert_stacks import ExpertStacks
from deepseek_tf.layers.moe_capacity import capacity_dispatch
from deepseek_tf.layers.moe_tiles import auto_tile_size, dim, dispatch_plan, in_xla
from deepseek_tf.layers.router import TopKRouter
from deepseek_tf.layers.serialization import init_config
from deepseek_tf.layers.structure import PrunableUnits, WeightSlice
from deepseek_tf.layers.swiglu import SwiGLU

DISPATCH = ("sparse", "dense")
CAPACITY_MIN_LOAD = 4  # mean assignments per expert from which capacity dispatch is used
UNROLLED_TILES = 16  # under XLA, stacks held (E, out, in) multiply up to this many tiles one by one


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DeepSeekMoE(ExpertStacks, keras.layers.Layer):
    """DeepSeekMoE feed-forward: `shared(x) + sum_k weight_k * expert_k(x)`.

    Every token goes through the shared experts (one SwiGLU of width
    `moe_hidden_dim * n_shared_experts`) and through `num_experts_per_tok`
    of `n_routed_experts` SwiGLU experts chosen by a `TopKRouter` (`gate`).
    The routed experts' weights are stacked: `experts_gate` and `experts_up`
    `(E, d_model, moe_hidden_dim)`, `experts_down` `(E, moe_hidden_dim, d_model)`.

    Dispatch:

    - `"sparse"`: exact (dropless) and XLA-compatible; compute scales with
      `num_experts_per_tok`, not with `E`. With at least 4 assignments per expert
      (training, prefill) the `N * k` assignments go expert-major into an
      `(E, C, d)` buffer (`C` = 1.25 x the mean load) multiplied by the stacked
      weights in place, with exact overflow rounds for experts above capacity
      (`moe_capacity.capacity_dispatch`). With fewer (decoding) they are laid
      out grouped by expert in row tiles (`tile_size`), every tile multiplied by
      its expert's gathered weights in one batched matmul (see `dispatch_plan`);
      those gathered weights take `n_tiles * 3 * d_model * moe_hidden_dim` values.
    - `"dense"`: the reference; every expert runs on every token and a dense
      `(N, E)` gate matrix combines them.

    Load balancing (DeepSeek-V3): with `topk_method="noaux_tc"` the router's
    non-trainable `e_score_correction_bias` only biases expert selection; the
    trainer calls `update_bias(expert_load)` after each optimiser step. The
    complementary sequence-wise balance loss `alpha * sum_i f_i P_i` (mean over
    sequences) is returned as `"aux_loss"` for the trainer to add.

    Args:
        d_model: input and output width.
        moe_hidden_dim: hidden width of each expert.
        n_routed_experts: routed experts `E`.
        n_shared_experts: shared experts (0: none).
        num_experts_per_tok: routed experts per token `k`.
        scoring_func, topk_method, n_group, topk_group, norm_topk_prob,
        routed_scaling_factor: see `TopKRouter`.
        bias_update_speed: `gamma` of the auxiliary-loss-free bias update.
        seq_aux_loss_alpha: weight `alpha` of the sequence-wise balance loss.
        dispatch: `"sparse"` or `"dense"`.
        init_std: std of the router's and the gate/up projections' initialiser.
        output_init_std: std of the down projections' initialiser.
        tile_size: rows per tile of the sparse dispatch; 0 chooses one from
            the token count at trace time (`auto_tile_size`).
        fake_quant: the shared experts' projections train against int8
            rounding (QAT; routed experts stay float).
        expert_quantize: `"none"`, or `"int8"` / `"int4"`: the routed experts'
            stacked weights are stored as weight-only codes plus float32 scales
            (`expert_quant`; not trainable) and dequantized per tile inside the
            expert matmuls. `quantize_experts` converts a float layer.
        expert_group_size: inputs per scale of quantized experts (-1: one scale
            per output channel of each expert).
        lora_rank: rank of low-rank adapters on the routed experts (0: none): each
            stack gets float32 `(E, in, r)` and `(E, r, out)` factors, added as
            `lora_alpha / lora_rank * a @ b` to the (frozen) stack; `enable_lora`
            adds them to a built layer (Keras' `Dense.enable_lora` for stacks).
        lora_alpha: the adapters' scale numerator.
        expert_parallel: shards `N` the routed experts are split into across the
            replicas of a `tf.distribute` strategy (1: none). Set by
            `shard_experts(N)` on a built layer; inside `strategy.run` each replica
            then computes its `E / N` experts for every replica's tokens
            (`expert_parallel.expert_parallel_dispatch`), elsewhere the layer reads
            the whole stacks.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, d_model)` (or `(N, d_model)`, one sequence).
        training: unused (the balance loss is computed on every call; the
            trainer decides whether to add it).
        return_hidden: also return `"hidden"`: the shared experts' gated
            activations `(B, T, moe_hidden_dim * n_shared_experts)`, or
            without shared experts the chosen routed experts'
            `(B, T, k * moe_hidden_dim)`.

    Returns:
        A dict: `"x"` `(B, T, d_model)`; `"expert_load"` `(E,)` float32, the
        fraction of this call's `(token, slot)` assignments each expert got
        (sums to 1); `"aux_loss"` float32 scalar (0 when
        `seq_aux_loss_alpha == 0`); and `"hidden"` when asked for.

    Examples:
    >>> moe = DeepSeekMoE(8, 16, n_routed_experts=4, n_shared_experts=1,
    ...                   num_experts_per_tok=2)
    >>> out = moe(keras.ops.ones((2, 3, 8)))
    >>> out["x"].shape, out["expert_load"].shape
    (TensorShape([2, 3, 8]), TensorShape([4]))
    """

    def __init__(
        self,
        d_model: int,
        moe_hidden_dim: int,
        n_routed_experts: int,
        n_shared_experts: int = 1,
        num_experts_per_tok: int = 2,
        scoring_func: str = "sigmoid",
        topk_method: str = "noaux_tc",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_speed: float = 0.001,
        seq_aux_loss_alpha: float = 0.0,
        dispatch: str = "sparse",
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        tile_size: int = 0,
        fake_quant: bool = False,
        expert_quantize: str = "none",
        expert_group_size: int = -1,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        expert_parallel: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if expert_quantize not in expert_quant.MODES:
            raise ValueError(
                f"expert_quantize must be one of {expert_quant.MODES}, got {expert_quantize!r}"
            )
        if expert_quantize != "none":
            expert_quant.check_group_size(d_model, expert_group_size, "expert_group_size")
            expert_quant.check_group_size(moe_hidden_dim, expert_group_size, "expert_group_size")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        if tile_size < 0:
            raise ValueError(f"tile_size must be >= 0, got {tile_size}")
        self.d_model = d_model
        self.moe_hidden_dim = moe_hidden_dim
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.scoring_func = scoring_func
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.bias_update_speed = bias_update_speed
        self.seq_aux_loss_alpha = seq_aux_loss_alpha
        self.dispatch = dispatch
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.tile_size = tile_size
        self.fake_quant = fake_quant
        self.expert_quantize = expert_quantize
        self.expert_group_size = expert_group_size
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.expert_parallel = expert_parallel

        policy = self.dtype_policy
        self.gate = TopKRouter(
            d_model,
            n_routed_experts,
            num_experts_per_tok,
            scoring_func=scoring_func,
            topk_method=topk_method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=routed_scaling_factor,
            init_std=init_std,
            dtype=policy,
            name="gate",
        )
        self.shared_experts = None
        if n_shared_experts:
            self.shared_experts = SwiGLU(
                d_model,
                moe_hidden_dim * n_shared_experts,
                init_std,
                output_init_std,
                fake_quant=fake_quant,
                dtype=policy,
                name="shared_experts",
            )

    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The stacked routed-expert weights: `{name: (E, in, out)}`."""
        e, d, h = self.n_routed_experts, self.d_model, self.moe_hidden_dim
        return {"experts_gate": (e, d, h), "experts_up": (e, d, h), "experts_down": (e, h, d)}

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)`: router kernel and balance bias, shared experts, and all
        routed experts (activated: the `num_experts_per_tok` a token uses)."""
        e, d, h = self.n_routed_experts, self.d_model, self.moe_hidden_dim
        fixed = d * e + e  # router kernel + e_score_correction_bias
        if self.shared_experts is not None:
            fixed += self.shared_experts.parameter_counts()[0]
        expert = 3 * d * h
        return fixed + expert * e, fixed + expert * self.num_experts_per_tok

    def prunable_units(self) -> list[PrunableUnits]:
        """Routed experts: the stacked weights' expert axis and the router's column
        (none once they are quantized)."""
        if self.expert_quantize != "none":
            return []
        slices = (
            WeightSlice(self, "experts_gate", 0, "in"),
            WeightSlice(self, "experts_up", 0, "in"),
            WeightSlice(self, "experts_down", 0, "out"),
            WeightSlice(self.gate, "kernel", 1, None),
        )
        blocks, fewest = 1, self.num_experts_per_tok
        if self.gate._grouped(self.topk_method, self.n_group):
            # group-limited routing: every group keeps as many experts, at least the two
            # its score sums and enough that the topk_group groups hold k experts
            blocks = self.n_group
            per_group = max(2, -(-self.num_experts_per_tok // self.topk_group))
            fewest = per_group * blocks
        units = PrunableUnits(
            "experts", self.n_routed_experts, fewest, slices, router=self.gate, blocks=blocks
        )
        return [units]

    def build(self, input_shape):
        self.gate.build((None, self.d_model))
        if self.shared_experts is not None:
            self.shared_experts.build(input_shape)
        self.build_expert_stacks()

    def call(self, x, training=None, return_hidden=False, active=None):
        """`active`: optional `(B,)` bool rows to route (others' routed output: zeros)."""
        lead_shape = ops.shape(x)[:-1]
        tokens = ops.reshape(x, (-1, self.d_model))  # (N, d)
        topk_idx, topk_weight, scores = self.gate(tokens)  # (N, k), (N, k), (N, E)
        routed_fn = self._sparse if self.dispatch == "sparse" else self._dense
        if self.experts_sharded and in_replicas():
            routed_fn = self._expert_parallel
        valid = None if active is None else moe_tiles.token_rows(active, lead_shape)  # (N,)
        routed, routed_hidden = routed_fn(tokens, topk_idx, topk_weight, return_hidden, valid)
        out = ops.reshape(routed, ops.shape(x))  # (B, T, d)
        hidden = None
        if self.shared_experts is not None:
            shared, hidden = self.shared_experts(x, return_hidden=True)
            out = out + shared
        elif return_hidden:
            hidden = ops.reshape(routed_hidden, (*lead_shape, -1))  # (B, T, k * h)

        flat_e = ops.reshape(topk_idx, (-1,))  # (A,)
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(flat_e, dtype="float32"), flat_e, self.n_routed_experts
        )  # (E,)
        result = {
            "x": out,
            "expert_load": counts / ops.sum(counts),
            "aux_loss": self._seq_aux_loss(x, topk_idx, scores),
        }
        if return_hidden:
            result["hidden"] = hidden
        return result

    def _dense(self, tokens, topk_idx, topk_weight, return_hidden, valid=None):
        """Reference: every expert on every token, combined by a dense `(N, E)` gate."""
        combine = ops.einsum(
            "nk,nke->ne", topk_weight, ops.one_hot(topk_idx, self.n_routed_experts)
        )  # (N, E) float32
        gate_w, up_w, down = (
            self.expert_stack(name, after=tokens)  # (E, in, out)
            for name in ("experts_gate", "experts_up", "experts_down")
        )
        gate = ops.einsum("nd,edh->neh", tokens, gate_w)  # (N, E, h)
        up = ops.einsum("nd,edh->neh", tokens, up_w)  # (N, E, h)
        hidden = ops.silu(gate) * up  # (N, E, h)
        expert_out = ops.einsum("neh,ehd->ned", hidden, down)  # (N, E, d)
        out = ops.einsum("ned,ne->nd", ops.cast(expert_out, "float32"), combine)  # (N, d)
        chosen_hidden = None
        if return_hidden:
            chosen_hidden = tf.gather(hidden, topk_idx, batch_dims=1)  # (N, k, h)
        return ops.cast(out, self.compute_dtype), chosen_hidden

    def _expert_parallel(self, tokens, topk_idx, topk_weight, return_hidden, valid=None):
        """This replica's experts for every replica's tokens (`expert_parallel_dispatch`)."""
        stacks = (
            ops.cast(tf.identity(self.expert_stack(name)), tokens.dtype)  # (E/N, in, out)
            for name in ("experts_gate", "experts_up", "experts_down")
        )
        out, hidden = expert_parallel_dispatch(
            tokens,
            topk_idx,
            topk_weight,
            tuple(stacks),
            n_experts=self.n_routed_experts,
            shards=self.expert_parallel,
            return_hidden=return_hidden and self.shared_experts is None,
        )  # (N, d), (N, k, h) or None
        return ops.cast(out, self.compute_dtype), hidden

    def _sparse(self, tokens, topk_idx, topk_weight, return_hidden, valid=None):
        """Exact top-k dispatch: expert-major capacity rounds for many tokens (training,
        prefill), expert-sorted row tiles of the `valid` ones for few or an unknown count."""
        n, k = dim(tokens, 0), self.num_experts_per_tok
        if isinstance(n, int) and n * k >= CAPACITY_MIN_LOAD * self.n_routed_experts:
            per_slot, hidden = capacity_dispatch(
                tokens,
                topk_idx,
                # tensors, not variables (the dispatch's custom gradient differentiates
                # w.r.t. its inputs), in the compute dtype (mixed precision)
                *(
                    ops.cast(tf.identity(stack), tokens.dtype)
                    for stack in self._stacks(transposed=self.stacks_out_in, after=tokens)
                ),
                return_hidden=return_hidden,
                transposed=self.stacks_out_in,
            )  # (N, k, d), (N, k, h) or None
            out = ops.einsum("nkd,nk->nd", ops.cast(per_slot, "float32"), topk_weight)  # (N, d)
            return ops.cast(out, self.compute_dtype), hidden
        tile = self.tile_size or auto_tile_size(n * k, self.n_routed_experts)
        # outside XLA, only the tiles the assignments use (see `dispatch_plan`)
        plan = dispatch_plan(topk_idx, self.n_routed_experts, tile, not in_xla(), valid)
        padded = ops.concatenate(
            [tokens, ops.zeros((1, self.d_model), tokens.dtype)], axis=0
        )  # (N + 1, d): row N is the padding row
        rows = tf.gather(padded, plan["row_token"])  # (R, d)
        rows = ops.reshape(rows, (plan["n_tiles"], tile, self.d_model))  # (n_tiles, tile, d)
        hidden, rows_out = self._tiles(rows, plan["tile_expert"])  # (n_tiles, tile, h|d)
        rows_out = ops.reshape(rows_out, (-1, self.d_model))  # (R, d)
        per_slot = moe_tiles.gather_rows(rows_out, plan["dest"])  # (N, k, d)
        out = ops.einsum("nkd,nk->nd", ops.cast(per_slot, "float32"), topk_weight)  # (N, d)
        chosen_hidden = None
        if return_hidden:
            hidden = ops.reshape(hidden, (-1, self.moe_hidden_dim))  # (R, h)
            chosen_hidden = moe_tiles.gather_rows(hidden, plan["dest"])  # (N, k, h)
        return ops.cast(out, self.compute_dtype), chosen_hidden

    def _stacks(self, index=None, transposed=False, after=None):
        """The gate, up and down stacks (`expert_stack`)."""
        names = ("experts_gate", "experts_up", "experts_down")
        return [self.expert_stack(n, index, after=after, transposed=transposed) for n in names]

    def _tiles(self, rows, tile_expert):
        """SwiGLU of each tile's expert on its rows `(n_tiles, tile, d)` -> hidden
        `(n_tiles, tile, h)` and outputs `(n_tiles, tile, d)`.

        Stacks held `(E, out, in)` (`transpose_stacks`) multiply with `transpose_b`; under
        XLA with few tiles (batch-1 decoding: one per routed expert) each tile's expert is
        gathered and multiplied on its own: XLA's CPU backend reads a gathered 16-bit
        matrix near the memory's bandwidth in a matrix-vector product, and converts the
        gathered experts to float32 first in a batched one (3.7x slower at the 1.46B
        demonstration's expert shapes, measured 2026-12-08)."""
        t = self.stacks_out_in
        n_tiles = rows.shape[0]
        if t and in_xla() and isinstance(n_tiles, int) and n_tiles <= UNROLLED_TILES:
            # one tile at a time: `(tile, d)` rows against `(h|d, d|h)` weights
            tiles = [self._swiglu(rows[j], self._stacks(tile_expert[j], transposed=True), True)
                     for j in range(n_tiles)]  # fmt: skip
            return tuple(ops.stack(parts) for parts in zip(*tiles))
        return self._swiglu(rows, self._stacks(tile_expert, transposed=t), t)

    @staticmethod
    def _swiglu(rows, stacks, transposed):
        """`(hidden, out)` of rows `(..., tile, d)` through `(..., d|h, h|d)` weights."""
        w_gate, w_up, w_down = stacks
        gate = tf.matmul(rows, w_gate, transpose_b=transposed)  # (..., tile, h)
        hidden = ops.silu(gate) * tf.matmul(rows, w_up, transpose_b=transposed)
        return hidden, tf.matmul(hidden, w_down, transpose_b=transposed)  # (..., tile, d)

    def _seq_aux_loss(self, x, topk_idx, scores):
        """`alpha * mean_b sum_i f_i P_i`, the DeepSeek-V3 sequence-wise balance loss.

        Per sequence of `T` tokens: `f_i = E / (k T) * #{(t, slot) routed to i}`,
        `P_i = mean_t s'_{i,t}` with `s'` the scores normalised over experts.
        """
        alpha = self.seq_aux_loss_alpha
        if not alpha:
            return ops.zeros((), "float32")
        e, k = self.n_routed_experts, self.num_experts_per_tok
        seq_len = dim(x, -2) if len(x.shape) == 3 else dim(x, 0)
        probs = scores / ops.sum(scores, axis=-1, keepdims=True)  # (N, E)
        probs = ops.reshape(probs, (-1, seq_len, e))  # (B, T, E)
        p = ops.mean(probs, axis=1)  # (B, E)
        idx = ops.reshape(topk_idx, (-1, seq_len * k))  # (B, T k)
        seq = tf.range(tf.shape(idx)[0])[:, None]  # (B, 1)
        n_seq = tf.shape(idx)[0]
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(idx, dtype="float32"), seq * e + idx, n_seq * e
        )  # (B E,)
        f = ops.reshape(counts, (-1, e)) * (e / (k * ops.cast(seq_len, "float32")))  # (B, E)
        return alpha * ops.mean(ops.sum(f * p, axis=-1))

    def update_bias(self, expert_load):
        """Auxiliary-loss-free balancing step: `b += gamma * sign(mean(load) - load)`.

        Overloaded experts' selection bias goes down by `bias_update_speed`,
        underloaded ones' up. A no-op unless `topk_method="noaux_tc"` and
        `bias_update_speed > 0`. Call it after each optimiser step with that
        step's `expert_load` `(E,)` (works inside a `tf.function`).
        """
        if self.topk_method != "noaux_tc" or not self.bias_update_speed:
            return
        load = ops.cast(expert_load, "float32")
        mean = ops.mean(load)
        # An expert exactly at the mean stays put: a difference within float32 rounding
        # of the fractions (e.g. averaged over replicas) counts as none.
        diff = ops.where(ops.abs(mean - load) <= 1e-6 * mean, 0.0, mean - load)
        step = self.bias_update_speed * ops.sign(diff)  # (E,)
        self.gate.e_score_correction_bias.assign_add(step)

    def compute_output_shape(self, input_shape):
        return {"x": input_shape, "expert_load": (self.n_routed_experts,), "aux_loss": ()}

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
