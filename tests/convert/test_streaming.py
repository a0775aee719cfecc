"""Conversion and loading stream the weights: no random initialisation of weights that
are then overwritten, one checkpoint tensor read at a time, large weights written in
blocks, and the safetensors writer holding one tensor at a time."""

import weakref

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.convert import CheckpointReader, ConversionError, stream_checkpoint
from deepseek_tf.convert.safetensors_writer import TensorSpec, write_checkpoint
from deepseek_tf.errors import RunDirError
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir

RANDOM_INITIALIZERS = (
    keras.initializers.RandomNormal,
    keras.initializers.RandomUniform,
    keras.initializers.TruncatedNormal,
    keras.initializers.GlorotUniform,
    keras.initializers.HeUniform,
)


def refuse_random_init(monkeypatch) -> None:
    """Fails any random initialiser that runs."""

    def refuse(self, shape, dtype=None, **kwargs):
        raise AssertionError(f"{type(self).__name__} ran for a weight of shape {shape}")

    for cls in RANDOM_INITIALIZERS:
        monkeypatch.setattr(cls, "__call__", refuse)


def count_restores(monkeypatch) -> list:
    """The tensor names of each RestoreV2 call; TensorFlow's whole-checkpoint restore fails."""
    calls, original = [], tf.raw_ops.RestoreV2

    def restore_v2(**kwargs):
        calls.append(list(kwargs["tensor_names"]))
        return original(**kwargs)

    def whole_restore(*args, **kwargs):
        raise AssertionError("tf.train.Checkpoint.restore reads every tensor at once")

    monkeypatch.setattr(tf.raw_ops, "RestoreV2", restore_v2)
    monkeypatch.setattr(tf.train.Checkpoint, "restore", whole_restore)
    return calls


@pytest.mark.parametrize("overrides", [[], ["train.lora_rank=2"]], ids=["plain", "lora"])
def test_a_run_loads_variable_by_variable_without_random_init(
    tiny_config, tmp_path, monkeypatch, overrides
):
    config = apply_overrides(tiny_config, ["model.vocab_size=37", *overrides])
    model = build_model(config, seed=3)
    for variable in model.variables:  # LoRA's b starts at zero: give every weight a value
        variable.assign(np.random.default_rng(0).normal(size=variable.shape) + 1)
    RunDir(tmp_path).write_weights_run(config, None, model)
    refuse_random_init(monkeypatch)
    calls = count_restores(monkeypatch)
    loaded, _ = RunDir(tmp_path).load()
    assert calls and all(len(names) == 1 for names in calls)  # one tensor per read
    assert len(calls) == len(loaded.variables) + 1  # the weights and the step
    paths = [[v.path.split("/", 1)[1] for v in m.variables] for m in (model, loaded)]
    assert paths[0] == paths[1]
    for want, got in zip(model.variables, loaded.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())  # bit-exact
    assert "_initialize_with_initializer" not in vars(keras.Variable)  # patch undone


def test_loading_a_trained_run_matches_tensorflows_restore(trained_run):
    run = RunDir(trained_run)
    loaded, _ = run.load()  # its checkpoint also holds the optimizer's state
    model = build_model(run.read_config(), seed=1)
    run.checkpoint(model).restore(weights_only=True)
    for want, got in zip(model.variables, loaded.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_a_mismatch_names_the_variable(tiny_config, tmp_path):
    config = apply_overrides(tiny_config, ["model.vocab_size=37"])
    RunDir(tmp_path).write_weights_run(config, None, build_model(config, seed=0))
    RunDir(tmp_path).write_config(apply_overrides(config, ["model.vocab_size=41"]))
    with pytest.raises(RunDirError, match=r"does not match the model \(.*37.* in the checkpoint"):
        RunDir(tmp_path).load()


TENSORS = {
    f"t{i}": np.random.default_rng(i).normal(size=(4, 3 + i)).astype(ml_dtypes.bfloat16)
    for i in range(5)
}


def test_the_writer_drops_each_tensor_before_asking_for_the_next(tmp_path):
    alive: list[weakref.ref] = []

    def chunks():
        for name, value in TENSORS.items():
            held = [name for name, ref in zip(TENSORS, alive) if ref() is not None]
            assert not held, f"{held} still held when {name} is asked for"
            array = value.copy()
            alive.append(weakref.ref(array))
            yield {name: array}
            del array

    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in TENSORS.items()]
    stream_checkpoint(specs, chunks(), tmp_path, max_shard_bytes=60)
    assert all(ref() is None for ref in alive)  # the last one too, and the producer ran out
    reader = CheckpointReader(tmp_path)
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(reader.get(name, value.dtype), value)


def test_a_tensor_left_over_is_refused(tmp_path):
    specs = [TensorSpec("t0", TENSORS["t0"].dtype, TENSORS["t0"].shape)]
    with pytest.raises(ConversionError, match="t1: produced but not planned"):
        stream_checkpoint(specs, iter([{"t0": TENSORS["t0"], "t1": TENSORS["t1"]}]), tmp_path)


def test_row_blocks_read_a_tensor_piece_by_piece(tmp_path):
    tensors = {"w": np.arange(60, dtype=np.float32).reshape(10, 6), "b": np.ones(3, np.float32)}
    write_checkpoint(tensors, tmp_path)
    reader = CheckpointReader(tmp_path)
    blocks = list(reader.row_blocks("w", ml_dtypes.bfloat16, block_bytes=3 * 6 * 4))
    assert [start for start, _ in blocks] == [0, 3, 6, 9]
    np.testing.assert_array_equal(
        np.concatenate([rows for _, rows in blocks]), tensors["w"].astype(ml_dtypes.bfloat16)
    )
    [(start, whole)] = reader.row_blocks("b", np.float32)
    assert start == 0 and whole.shape == (3,)


@pytest.mark.hf
def test_a_round_trip_in_small_blocks_is_bit_exact(tmp_path, monkeypatch):
    """`convert --from-hf` in 256-byte blocks, no random weights, then `--to-hf` one
    tensor per chunk: every tensor comes back bit for bit."""
    pytest.importorskip("transformers")
    from convert_helpers import hf_config, hf_model

    import deepseek_tf.convert.hf as hf_module
    import deepseek_tf.convert.safetensors_io as safetensors_io
    from deepseek_tf.convert import convert_from_hf, convert_to_hf

    hf_model(hf_config(first_k_dense_replace=1), seed=2).save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(safetensors_io, "BLOCK_BYTES", 256)
    refuse_random_init(monkeypatch)
    blocks = []
    original_assign = tf.raw_ops.ResourceStridedSliceAssign

    def slice_assign(**kwargs):
        blocks.append(kwargs["begin"])
        return original_assign(**kwargs)

    monkeypatch.setattr(tf.raw_ops, "ResourceStridedSliceAssign", slice_assign)
    convert_from_hf(tmp_path / "hf", tmp_path / "run", dtype="float32")
    assert len(blocks) > 50  # the embedding, kernels and experts went in pieces

    chunk_sizes, writer = [], hf_module.stream_checkpoint

    def stream(specs, chunks, *args):
        def counted():
            for chunk in chunks:
                chunk_sizes.append(len(chunk))
                yield chunk

        return writer(specs, counted(), *args)

    monkeypatch.setattr(hf_module, "stream_checkpoint", stream)
    count_restores(monkeypatch)
    convert_to_hf(tmp_path / "run", tmp_path / "back")
    assert chunk_sizes and set(chunk_sizes) == {1}
    source, back = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "back")
    assert sorted(back.names()) == sorted(source.names())
    for name in source.names():
        np.testing.assert_array_equal(back.get(name), source.get(name), err_msg=name)
