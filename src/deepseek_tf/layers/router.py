"""DeepSeek top-k expert router (V2 softmax / V3 sigmoid with auxiliary-loss-free bias)."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from deepseek_tf.layers.serialization import init_config

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class TopKRouter(keras.layers.Layer):
    """Chooses `top_k` routed experts per token and their gate weights.

    Scores are `sigmoid` (DeepSeek-V3) or `softmax` (DeepSeek-V2) of float32
    router logits `x @ kernel`. Expert selection depends on `topk_method`:

    - `"noaux_tc"` (V3): top-k of `scores + e_score_correction_bias`. The bias
      is the auxiliary-loss-free balancing term; it steers *which* experts are
      chosen but never the gate weights. With `n_group > 1` a token may only
      use the `topk_group` groups whose sum of their two best biased scores is
      largest.
    - `"greedy"` (V2): top-k of the scores.
    - `"group_limited_greedy"` (V2): top-k among the `topk_group` groups with
      the largest maximum score.

    Gate weights are the (unbiased) scores of the chosen experts, divided by
    their sum when `norm_topk_prob` (plus 1e-20, as Hugging Face), then
    multiplied by `routed_scaling_factor`. Everything is computed in float32
    whatever the layer's dtype policy; `kernel` is stored `(d_model, n_experts)`
    (Hugging Face's `gate.weight` transposed).

    Args:
        d_model: input width.
        n_experts: number of routed experts `E`.
        top_k: experts per token `k`.
        scoring_func: `"sigmoid"` or `"softmax"`.
        topk_method: `"noaux_tc"`, `"greedy"` or `"group_limited_greedy"`.
        n_group: expert groups (must divide `n_experts`) for the group-limited
            methods; ignored by `"greedy"`.
        topk_group: groups a token may use.
        norm_topk_prob: renormalise the chosen gate weights to sum to 1.
        routed_scaling_factor: multiplies the gate weights.
        init_std: std of the kernel's normal initialiser.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(N, d_model)` tokens (any float dtype).

    Returns:
        `(topk_idx, topk_weight, scores)`: `(N, k)` int32 expert ids (in
        decreasing order of the selection score), `(N, k)` float32 gate weights
        and the `(N, E)` float32 unbiased scores.

    Examples:
    >>> router = TopKRouter(d_model=8, n_experts=4, top_k=2)
    >>> idx, weight, scores = router(keras.ops.ones((3, 8)))
    >>> idx.shape, weight.shape, scores.shape
    (TensorShape([3, 2]), TensorShape([3, 2]), TensorShape([3, 4]))
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        scoring_func: str = "sigmoid",
        topk_method: str = "noaux_tc",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        init_std: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        if n_group < 1 or n_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide n_experts={n_experts}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if self._grouped(topk_method, n_group) and top_k > topk_group * (n_experts // n_group):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_group} groups x "
                f"{n_experts // n_group} experts a token may use"
            )
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.scoring_func = scoring_func
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.init_std = init_std

    @staticmethod
    def _grouped(topk_method: str, n_group: int) -> bool:
        return topk_method != "greedy" and n_group > 1

    def build(self, input_shape=None):
        # float32 and never autocast: the router runs in float32 under mixed precision.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.d_model, self.n_experts),
            initializer=keras.initializers.RandomNormal(stddev=self.init_std),
            dtype="float32",
            autocast=False,
        )
        self.e_score_correction_bias = self.add_weight(
            name="e_score_correction_bias",
            shape=(self.n_experts,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
        )

    def call(self, x):
        logits = ops.matmul(ops.cast(x, "float32"), self.kernel)  # (N, E)
        if self.scoring_func == "sigmoid":
            scores = ops.sigmoid(logits)
        else:
            scores = ops.softmax(logits, axis=-1)
        choice = scores
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias[None, :]  # (N, E)
        if self._grouped(self.topk_method, self.n_group):
            choice = self._mask_groups(choice)
        # Selection carries no gradient; the weights are gathered from `scores`.
        _, topk_idx = tf.math.top_k(tf.stop_gradient(choice), k=self.top_k)  # (N, k)
        topk_weight = tf.gather(scores, topk_idx, batch_dims=1)  # (N, k)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (ops.sum(topk_weight, axis=-1, keepdims=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return ops.cast(topk_idx, "int32"), topk_weight, scores

    def _mask_groups(self, choice):
        """`choice` with the experts outside each token's `topk_group` best groups at -inf."""
        group_size = self.n_experts // self.n_group
        grouped = ops.reshape(choice, (-1, self.n_group, group_size))  # (N, G, E/G)
        if self.topk_method == "noaux_tc":  # sum of the two best (biased) scores
            best, _ = tf.math.top_k(grouped, k=min(2, group_size))  # (N, G, 2)
            group_scores = ops.sum(best, axis=-1)  # (N, G)
        else:  # group_limited_greedy: best score
            group_scores = ops.max(grouped, axis=-1)  # (N, G)
        _, group_idx = tf.math.top_k(group_scores, k=self.topk_group)  # (N, topk_group)
        group_mask = ops.sum(ops.one_hot(group_idx, self.n_group), axis=1) > 0  # (N, G)
        masked = ops.where(group_mask[:, :, None], grouped, float("-inf"))  # (N, G, E/G)
        return ops.reshape(masked, (-1, self.n_experts))  # (N, E)

    def compute_output_shape(self, input_shape):
        n = input_shape[0]
        return (n, self.top_k), (n, self.top_k), (n, self.n_experts)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
