"""`quantized_structure` builds what Keras' `Dense.quantize` leaves on a layer (variables,
their shapes and dtypes, the dtype policy), without computing codes from the float kernel."""

import keras
import numpy as np
import pytest

from deepseek_tf.models.quantization import quantization_config, quantized_structure


def dense(dtype: str) -> keras.layers.Dense:
    layer = keras.layers.Dense(24, use_bias=False, dtype=dtype)
    layer.build((None, 40))
    return layer


def layout(layer) -> list:
    return [(v.path.split("/")[-1], tuple(v.shape), v.dtype) for v in layer.variables]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("mode", "group"), [("int8", -1), ("int4", -1), ("int4", 8)])
def test_the_structure_equals_what_keras_quantize_leaves(mode, group, dtype):
    cfg = quantization_config(mode, 4, group)
    quantized, built = dense(dtype), dense(dtype)
    quantized.quantize(mode, config=cfg)
    kernel = built._kernel
    quantized_structure(built, mode, cfg)
    assert layout(built) == layout(quantized)
    assert built.dtype_policy.name == quantized.dtype_policy.name
    assert built.quantization_mode == mode and all(v is not kernel for v in built.variables)
    for target, source in zip(built.variables, quantized.variables):  # loading: values copied
        target.assign(source)
    x = np.random.default_rng(0).normal(size=(3, 40)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(built(x)), np.asarray(quantized(x)))
