"""The streaming safetensors writer: headers from a plan, tensors written as produced."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from deepseek_tf.convert import CheckpointReader, ConversionError, stream_checkpoint
from deepseek_tf.convert.safetensors_writer import TensorSpec, write_checkpoint

RNG = np.random.default_rng(0)
TENSORS = {
    "a.weight": RNG.normal(size=(8, 4)).astype(np.float32),
    "b.weight": RNG.normal(size=(16, 4)).astype(ml_dtypes.bfloat16),
    "c.bias": RNG.normal(size=(3,)).astype(np.float32),
    "d.weight": RNG.normal(size=(5, 5)).astype(ml_dtypes.bfloat16),
}


def _specs(tensors):
    return [TensorSpec(k, v.dtype, v.shape) for k, v in tensors.items()]


def test_single_file_is_read_by_safetensors_and_by_our_reader(tmp_path):
    produced = []

    def chunks():  # lazily, one at a time
        for name, value in TENSORS.items():
            produced.append(name)
            yield {name: value}

    files = stream_checkpoint(_specs(TENSORS), chunks(), tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert reader.dtype(name) == ("BF16" if value.dtype == ml_dtypes.bfloat16 else "F32")
        np.testing.assert_array_equal(reader.get(name, value.dtype), value)
    with open(tmp_path / "model.safetensors", "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    assert length % 8 == 0
    assert produced == list(TENSORS)


def test_shards_and_index(tmp_path):
    files = write_checkpoint(TENSORS, tmp_path, max_shard_bytes=100)
    names = [f.name for f in files]
    assert names[-1] == "model.safetensors.index.json" and len(names) >= 4
    assert names[0] == f"model-00001-of-{len(names) - 1:05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TENSORS)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in TENSORS.values())
    reader = CheckpointReader(tmp_path)
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(reader.get(name, value.dtype), value)


def test_a_chunk_that_breaks_the_plan_is_refused(tmp_path):
    specs = _specs(TENSORS)
    wrong = [{"a.weight": TENSORS["a.weight"]}, {"c.bias": TENSORS["c.bias"]}]
    with pytest.raises(ConversionError, match="c.bias .*expected b.weight"):
        stream_checkpoint(specs, iter(wrong), tmp_path)
    short = [{"a.weight": TENSORS["a.weight"]}]
    with pytest.raises(ConversionError, match="b.weight: planned but never produced"):
        stream_checkpoint(specs, iter(short), tmp_path)
    bad_dtype = [{"a.weight": TENSORS["a.weight"].astype(np.float64)}]
    with pytest.raises(ConversionError, match="a.weight float64"):
        stream_checkpoint(specs, iter(bad_dtype), tmp_path)
