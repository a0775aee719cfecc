"""The brief's probabilistic head (section 8.1): a Gaussian over the final hidden state.

Two Dense heads give the mean and the log-variance of a diagonal Gaussian,
`tfd.MultivariateNormalDiag(loc=mean, scale_diag=exp(0.5 * log_var))`; the model feeds
reparameterised samples of it through its output head, so the next-token distribution
is a mixture over the latent (a deep variational information bottleneck, Alemi et al.
2017). Training maximises the evidence lower bound: the token loss averaged over samples
plus a weighted KL divergence to the prior.

The prior is the standard normal `N(0, I)`: the final RMSNorm already gives the hidden
state about unit scale per feature, so `N(0, I)` matches the scale the output head was
built for, and its closed-form KL keeps the loss exact. TFP distributions are used on
plain tensors inside this Keras 3 layer (`tfp.layers` are tf_keras classes that Keras 3
models reject).
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from keras import ops

from deepseek_tf.layers.serialization import init_config


@functools.cache
def _tfd():
    """`tfp.distributions`, imported on first use: TensorFlow Probability adds about 1.5 s
    to every process start, and only a model with this head needs it."""
    import tensorflow_probability as tfp

    return tfp.distributions


@keras.saving.register_keras_serializable(package="deepseek_tf")
class GaussianHead(keras.layers.Layer):
    """Mean and log-variance of a diagonal Gaussian over the final hidden state.

    `loc` starts as the identity map and the log-variance as `init_log_var` everywhere,
    so an untrained head passes the hidden state through with a little noise.

    Args:
        d_model: width of the hidden state (and of the latent).
        init_log_var: initial log-variance (the bias of the log-variance head).
        seed: seed of the sampling noise during training.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        hidden: `(..., d_model)` final hidden states.

    Returns:
        `(loc, log_var)`, both `(..., d_model)` float32.

    Examples:
    >>> head = GaussianHead(8)
    >>> loc, log_var = head(keras.ops.ones((2, 3, 8)))
    >>> head.distribution(loc, log_var).event_shape
    TensorShape([8])
    """

    def __init__(self, d_model: int, init_log_var: float = -4.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.init_log_var = init_log_var
        self.seed = seed
        self.loc_proj = keras.layers.Dense(
            d_model, kernel_initializer="identity", dtype=self.dtype_policy, name="loc"
        )
        self.log_var_proj = keras.layers.Dense(
            d_model,
            kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(init_log_var),
            dtype=self.dtype_policy,
            name="log_var",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.loc_proj.build(input_shape)
        self.log_var_proj.build(input_shape)

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)`: two `(d, d)` kernels with their biases."""
        total = 2 * (self.d_model * self.d_model + self.d_model)
        return total, total

    def call(self, hidden):
        loc = ops.cast(self.loc_proj(hidden), "float32")  # (..., d)
        log_var = ops.cast(self.log_var_proj(hidden), "float32")  # (..., d)
        return loc, log_var

    @staticmethod
    def distribution(loc, log_var):
        """The brief's `tfd.MultivariateNormalDiag(loc, scale_diag=exp(0.5 * log_var))`."""
        return _tfd().MultivariateNormalDiag(loc=loc, scale_diag=tf.exp(0.5 * log_var))

    @staticmethod
    def prior(loc):
        """The standard normal prior over the latent (see the module docstring)."""
        return _tfd().MultivariateNormalDiag(loc=tf.zeros_like(loc), scale_diag=tf.ones_like(loc))

    def kl_to_prior(self, loc, log_var):
        """`KL(q(z | h) || N(0, I))` per position, in closed form (TFP)."""
        return _tfd().kl_divergence(self.distribution(loc, log_var), self.prior(loc))

    def sample(self, loc, log_var, samples: int, seed=None):
        """`(S, ..., d)` reparameterised samples; `seed` a `(2,)` int32 stateless seed
        (default: drawn from the layer's seed generator)."""
        if seed is None:
            seed = tf.cast(self.seed_generator.next(), tf.int32)
        return self.distribution(loc, log_var).sample(samples, seed=seed)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
