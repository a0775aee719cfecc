"""ONNX export: the logits graph runs in onnxruntime with dynamic batch and length."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")

from deepseek_tf.errors import InputError  # noqa: E402
from deepseek_tf.export.onnx import export_onnx, onnx_logits  # noqa: E402


def test_onnx_logits_match_keras(loaded, tmp_path):
    model, _ = loaded
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path)
    assert report["max_abs_logit_diff"] < 1e-4
    ids = np.array([[3, 1, 4, 1, 5, 9, 2]], np.int32)
    np.testing.assert_allclose(onnx_logits(path, ids), np.asarray(model(ids)), atol=1e-4)


def test_onnx_refuses_moe(tmp_path):
    fake = SimpleNamespace(moe_layers=[False, True])
    with pytest.raises(InputError, match="MoE"):
        export_onnx(fake, tmp_path / "moe.onnx")
