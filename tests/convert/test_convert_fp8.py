"""DeepSeek-V3's block-FP8 checkpoints: dequantised on conversion, exactly as published."""

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_logits, hf_model, random_ids, rel_err  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.convert import convert_from_hf, dequantize_fp8, quantize_fp8  # noqa: E402

pytestmark = pytest.mark.hf

BLOCK = 128
# The linear layers DeepSeek-V3 ships in FP8: attention, dense and expert MLPs (not the router).
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*(proj)\.weight$")


def fp8_blocks(weight: np.ndarray):
    """Reference block quantisation: scale_inv = amax / 448 per 128x128 tile."""
    rows, cols = weight.shape
    grid = (-(-rows // BLOCK), -(-cols // BLOCK))
    scale_inv = np.zeros(grid, np.float32)
    fp8 = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale_inv[i, j] = np.abs(tile).max() / 448.0
            fp8[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (
                tile / scale_inv[i, j]
            ).astype(ml_dtypes.float8_e4m3fn)
    return fp8, scale_inv


def manual_dequant(fp8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    out = fp8.astype(np.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= scale_inv[i, j]
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(unquantised HF model, FP8 dir, dequantised-weights dir, quantised tensors)."""
    # intermediate_size 160: the dense MLP's weights span two 128-row/column blocks
    hf = hf_model(hf_config(first_k_dense_replace=1, intermediate_size=160), seed=4)
    root = tmp_path_factory.mktemp("fp8")
    hf.save_pretrained(root / "hf")
    tensors = load_file(root / "hf" / "model.safetensors")
    fp8_tensors, dequant_tensors, quantized = {}, {}, {}
    for name, value in tensors.items():
        if QUANTIZED.match(name):
            fp8, scale_inv = fp8_blocks(value)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = fp8, scale_inv
            dequant_tensors[name] = manual_dequant(fp8, scale_inv)
            quantized[name] = (fp8, scale_inv)
        else:
            fp8_tensors[name] = dequant_tensors[name] = value
    config = json.loads((root / "hf" / "config.json").read_text())
    for name, data in (("fp8", fp8_tensors), ("dequant", dequant_tensors)):
        (root / name).mkdir()
        save_file(data, root / name / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(root / "hf" / "config.json", root / name / "config.json")
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (root / "fp8" / "config.json").write_text(json.dumps(config))
    return hf, root, quantized


def test_fp8_weights_are_dequantised_blockwise(fp8_checkpoint):
    from transformers import AutoModelForCausalLM

    hf, root, quantized = fp8_checkpoint
    assert quantized["model.layers.0.mlp.gate_proj.weight"][1].shape == (2, 1)
    convert_from_hf(root / "fp8", root / "run", dtype="float32")
    model, _ = deepseek_tf.load(root / "run")
    kernel = model.blocks[0].ffn.gate_proj.kernel.numpy()
    np.testing.assert_array_equal(
        kernel.T, manual_dequant(*quantized["model.layers.0.mlp.gate_proj.weight"])
    )
    expert = model.blocks[1].ffn.experts_down.numpy()[5]
    np.testing.assert_array_equal(
        expert.T, manual_dequant(*quantized["model.layers.1.mlp.experts.5.down_proj.weight"])
    )
    ids = random_ids(hf.config.vocab_size, (2, 16), seed=5)
    ours = np.asarray(model(ids))
    dequantised = AutoModelForCausalLM.from_pretrained(root / "dequant").eval()
    assert rel_err(ours, hf_logits(dequantised, ids)) < 1e-4
    fp8_err = rel_err(ours, hf_logits(hf, ids))
    print(f"FP8 vs unquantised logits: {fp8_err:.3f}")
    assert 1e-4 < fp8_err < 0.2  # quantised, but within e4m3's ~2^-4 relative precision


def test_quantize_dequantize_helpers():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(200, 300)).astype(np.float32)
    fp8, scale_inv = quantize_fp8(weight)
    assert fp8.dtype == ml_dtypes.float8_e4m3fn and scale_inv.shape == (2, 3)
    ref_fp8, ref_scale = fp8_blocks(weight)
    np.testing.assert_allclose(scale_inv, ref_scale, rtol=1e-6)
    restored = dequantize_fp8(fp8, scale_inv, (BLOCK, BLOCK))
    np.testing.assert_array_equal(restored, manual_dequant(fp8, scale_inv))
    assert np.abs(restored - weight).max() <= np.abs(weight).max() * 2.0**-4


def test_fp8_checkpoint_becomes_a_bfloat16_run_by_default(fp8_checkpoint):
    """bfloat16 weights that train in bfloat16 and load in what this machine multiplies
    fastest (`model.dtype: auto`: float32 on a CPU without native bfloat16)."""
    import ml_dtypes

    from deepseek_tf.models.builder import native_bfloat16
    from deepseek_tf.rundir import RunDir

    _, root, quantized = fp8_checkpoint
    convert_from_hf(root / "fp8", root / "run_bf16")
    config = RunDir(root / "run_bf16").read_config()
    assert config.train.precision == "bfloat16" and config.model.dtype == "auto"
    model, _ = deepseek_tf.load(root / "run_bf16")
    kernel = model.blocks[0].ffn.gate_proj.kernel
    assert kernel.dtype == ("bfloat16" if native_bfloat16() else "float32")
    want = manual_dequant(*quantized["model.layers.0.mlp.gate_proj.weight"])
    bf16_values = want.astype(ml_dtypes.bfloat16).astype(np.float32)  # what was stored
    np.testing.assert_array_equal(kernel.numpy().astype(np.float32).T, bf16_values)
    assert model.blocks[1].ffn.gate.kernel.dtype == "float32"  # the router stays float32
