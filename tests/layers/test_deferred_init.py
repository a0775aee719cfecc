"""`layers.deferred_init`: Keras variables built without running their initialisers.

The module patches `keras.Variable._initialize_with_initializer`, which Keras does not
document: these tests fail if Keras renames it, changes its signature or stops creating
variables through it, so an upgrade cannot silently turn the patch into a no-op (loading
would then hold the model twice) or into a crash.
"""

import doctest
import inspect

import keras
import numpy as np

from deepseek_tf.layers import deferred_init
from deepseek_tf.layers.deferred_init import PATCHED_METHOD, initializers_skipped


class CountingInitializer(keras.initializers.Initializer):
    """Ones, counting its calls."""

    calls = 0

    def __call__(self, shape, dtype=None):
        CountingInitializer.calls += 1
        return keras.ops.ones(shape, dtype=dtype)


def test_keras_still_has_the_patched_method_with_its_signature():
    method = getattr(keras.Variable, PATCHED_METHOD, None)
    assert method is not None, f"keras.Variable.{PATCHED_METHOD} is gone: see deferred_init"
    assert list(inspect.signature(method).parameters) == ["self", "initializer"]


def test_keras_creates_variables_through_the_patched_method(monkeypatch):
    seen, original = [], getattr(keras.Variable, PATCHED_METHOD)

    def spy(self, initializer):
        seen.append(initializer)
        return original(self, initializer)

    monkeypatch.setattr(keras.Variable, PATCHED_METHOD, spy)
    layer = keras.layers.Dense(3, kernel_initializer=CountingInitializer())
    layer.build((None, 2))
    assert any(isinstance(i, CountingInitializer) for i in seen)


def test_the_patch_skips_the_initializer_and_runs_it_later():
    CountingInitializer.calls = 0
    with initializers_skipped() as skipped:
        layer = keras.layers.Dense(8, kernel_initializer=CountingInitializer())
        layer.build((None, 4))
    assert CountingInitializer.calls == 0  # the kernel's memory was never written
    assert PATCHED_METHOD not in vars(keras.Variable)  # the patch is undone
    assert len(skipped.pending) == 2  # kernel and bias
    layer.bias.assign(np.full(8, 2.0, np.float32))  # "loaded"
    assert skipped.run_except(layer, [layer.bias]) == 1  # the kernel only
    assert CountingInitializer.calls == 1
    np.testing.assert_array_equal(layer.kernel.numpy(), np.ones((4, 8), np.float32))
    np.testing.assert_array_equal(layer.bias.numpy(), np.full(8, 2.0, np.float32))


def test_zero_fill_and_nothing_skipped_outside_the_block():
    with initializers_skipped(zero_fill=True):  # for a build that computes from them
        zeroed = keras.layers.Dense(8, kernel_initializer="ones")
        zeroed.build((None, 4))
    np.testing.assert_array_equal(zeroed.kernel.numpy(), np.zeros((4, 8), np.float32))
    with initializers_skipped():
        with initializers_skipped():  # nested: the patch stays until the outer block ends
            pass
        assert vars(keras.Variable)[PATCHED_METHOD] is deferred_init._uninitialized
    CountingInitializer.calls = 0
    fresh = keras.layers.Dense(8, kernel_initializer=CountingInitializer())
    fresh.build((None, 4))  # outside any block: initialised as usual
    assert CountingInitializer.calls == 1
    np.testing.assert_array_equal(fresh.kernel.numpy(), np.ones((4, 8), np.float32))


def test_the_examples_run():
    result = doctest.testmod(deferred_init)
    assert result.attempted and not result.failed
