"""`training.restore`: a checkpoint's weights restored one variable at a time, the newest
readable checkpoint first, a mismatch named."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import RunDirError
from deepseek_tf.training.checkpoint import RunCheckpoint
from deepseek_tf.training.restore import checkpoint_variables, restore_weights


def _model(width: int = 3, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(2)])


def _saved(tmp_path, steps=(1,)) -> list[keras.Model]:
    """Checkpoints of differently seeded models at `steps`; returns the models."""
    models = []
    for step in steps:
        model = _model(seed=step)
        RunCheckpoint(tmp_path, model).save(step)
        models.append(model)
    return models


def test_each_variable_is_read_on_its_own_and_bit_exact(tmp_path, monkeypatch):
    (saved,) = _saved(tmp_path, steps=(5,))
    calls, original = [], tf.raw_ops.RestoreV2

    def restore_v2(**kwargs):
        calls.append(list(kwargs["tensor_names"]))
        return original(**kwargs)

    def whole_restore(*args, **kwargs):
        raise AssertionError("tf.train.Checkpoint.restore reads every tensor at once")

    monkeypatch.setattr(tf.raw_ops, "RestoreV2", restore_v2)
    monkeypatch.setattr(tf.train.Checkpoint, "restore", whole_restore)
    model = _model(seed=9)
    checkpoint = RunCheckpoint(tmp_path, model)
    assert restore_weights(checkpoint) == 5
    assert len(calls) == len(checkpoint_variables(checkpoint.checkpoint)) == 4 + 1  # + step
    assert all(len(names) == 1 for names in calls)
    for want, got in zip(saved.variables, model.variables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_a_corrupt_newest_checkpoint_is_named_and_the_one_before_restored(tmp_path):
    older, _ = _saved(tmp_path, steps=(1, 2))
    data = next(tmp_path.glob("ckpt-2.data-*"))
    data.write_bytes(data.read_bytes()[:10])  # truncated by a kill
    notes = []
    model = _model(seed=9)
    checkpoint = RunCheckpoint(tmp_path, model, log=notes.append)
    assert restore_weights(checkpoint) == 1
    assert checkpoint.unreadable == [str(tmp_path / "ckpt-2")]
    assert len(notes) == 1 and "ckpt-2.data" in notes[0] and "falling back to ckpt-1" in notes[0]
    np.testing.assert_array_equal(model.variables[0].numpy(), older.variables[0].numpy())


def test_a_checkpoint_of_another_model_is_named(tmp_path):
    _saved(tmp_path)
    with pytest.raises(RunDirError, match=r"does not match the model \(.*\[4, 3\] in the che"):
        restore_weights(RunCheckpoint(tmp_path, _model(width=5)))
    bigger = _model()
    bigger.add(keras.layers.Dense(2))  # a layer the checkpoint does not have
    with pytest.raises(RunDirError, match="not in the checkpoint"):
        restore_weights(RunCheckpoint(tmp_path, bigger))


def test_no_checkpoint_at_all(tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint to restore"):
        restore_weights(RunCheckpoint(tmp_path, _model()))


def test_floats_are_cast_to_the_variables_dtype_and_other_dtypes_must_match(tmp_path):
    (saved,) = _saved(tmp_path)
    keras.utils.set_random_seed(9)
    layers = [keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"), keras.layers.Dense(2)]
    model = keras.Sequential(layers)
    assert restore_weights(RunCheckpoint(tmp_path, model)) == 1
    kernel = model.layers[0].kernel
    assert kernel.dtype == "bfloat16"
    want = tf.cast(saved.layers[0].kernel, tf.bfloat16).numpy()
    np.testing.assert_array_equal(kernel.numpy(), want)

    class Codes(keras.layers.Layer):
        def __init__(self, dtype, **kwargs):
            super().__init__(**kwargs)
            self.codes = self.add_weight(shape=(2,), dtype=dtype, initializer="zeros")

        def call(self, x):
            return x

    codes = tmp_path / "codes"
    RunCheckpoint(codes, keras.Sequential([keras.Input((2,)), Codes("int8")])).save(1)
    floats = keras.Sequential([keras.Input((2,)), Codes("float32")])
    with pytest.raises(RunDirError, match=r"int8\[2\] in the checkpoint, float32\[2\]"):
        restore_weights(RunCheckpoint(codes, floats))
