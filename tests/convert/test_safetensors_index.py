"""A safetensors index names shard files: only files inside the model directory are read."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from deepseek_tf.convert import CheckpointReader, ConversionError


def _model_dir(tmp_path, shard_name):
    """A model directory whose index maps one tensor to `shard_name`; a real shard lies
    beside the directory (outside it)."""
    outside = tmp_path / "secret.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": np.zeros((2, 2), np.float32)}, str(model / "inside.safetensors"))
    os.symlink(outside, model / "link.safetensors")
    index = {"metadata": {}, "weight_map": {"w": shard_name}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize(
    "shard_name",
    ["../secret.safetensors", "sub/../../secret.safetensors", "{abs}", "link.safetensors"],
)
def test_an_index_cannot_read_outside_the_model_directory(tmp_path, shard_name):
    name = shard_name.format(abs=tmp_path / "secret.safetensors")
    with pytest.raises(ConversionError, match="points outside the model directory"):
        CheckpointReader(_model_dir(tmp_path, name))


@pytest.mark.parametrize("shard_name", [["x"], 5, "", None])
def test_an_index_entry_that_is_no_file_name(tmp_path, shard_name):
    with pytest.raises(ConversionError, match="is not a file name"):
        CheckpointReader(_model_dir(tmp_path, shard_name))


def test_a_shard_inside_is_read(tmp_path):
    reader = CheckpointReader(_model_dir(tmp_path, "inside.safetensors"))
    np.testing.assert_array_equal(reader.get("w"), np.zeros((2, 2), np.float32))
