"""Quantisation-aware training: fake-quant matches Keras int8, and conversion is exact."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.cli.main import main
from deepseek_tf.layers.fake_quant_dense import FakeQuantDense, fake_quant
from deepseek_tf.rundir import load_run


def test_fake_quant_dense_equals_keras_int8_dense_with_straight_through_gradient():
    x = np.random.RandomState(0).randn(3, 5, 16).astype("float32")
    fq = FakeQuantDense(8, use_bias=False)
    fq.build((None, 16))
    dense = keras.layers.Dense(8, use_bias=False)
    dense.build((None, 16))
    dense.set_weights(fq.get_weights())
    float_out = np.asarray(dense(x))
    dense.quantize("int8")
    np.testing.assert_allclose(np.asarray(fq(x)), np.asarray(dense(x)), atol=1e-5)
    assert np.abs(np.asarray(fq(x)) - float_out).max() > 1e-4  # rounding happened
    w = tf.Variable(np.random.RandomState(1).randn(4, 3).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fake_quant(w, axis=0) * 2.0)
    np.testing.assert_allclose(tape.gradient(loss, w), np.full((4, 3), 2.0))  # identity


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_qat_finetunes_then_converts_to_int8_exactly(trained_run, tmp_path, capsys):
    out = tmp_path / "qat"
    code = main(["compress", "qat", str(trained_run), "--out", str(out), "--steps", "6", "--quiet"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Same arithmetic up to float rounding, which can flip an activation's int8 rounding
    # at a .5 boundary (one grid step): measured 1.1e-4 at most, 2e-6 on average, on
    # logits of magnitude ~1. The same weights unquantized differ by 2e-3, the source's
    # (before fine-tuning) by 5e-2.
    assert record["max_abs_logit_diff_qat_vs_int8"] < 5e-4
    int8_model, tokenizer = load_run(out)
    source, _ = load_run(trained_run)
    layer = int8_model.blocks[0].ffn.gate_proj
    assert layer._kernel.dtype == "int8"  # on the int8 grid after conversion
    assert int(np.abs(np.asarray(layer._kernel)).max()) == 127  # absmax per channel
    # Fine-tuning moved the weights: the converted kernel is not the source's PTQ kernel.
    ptq = keras.layers.Dense(64, use_bias=False)
    ptq.build((None, 32))
    ptq.set_weights(source.blocks[0].ffn.gate_proj.get_weights())
    ptq.quantize("int8")
    assert np.any(np.asarray(ptq._kernel) != np.asarray(layer._kernel))
    ids = np.asarray([tokenizer.encode("ROMEO:")], np.int32)
    assert np.isfinite(np.asarray(int8_model(ids))).all()


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_qat_refuses_an_already_quantized_run(trained_run, tmp_path, capsys):
    first = tmp_path / "int8"
    assert (
        main(
            [
                "compress",
                "quantize",
                str(trained_run),
                "--out",
                str(first),
                "--mode",
                "int8",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["compress", "qat", str(first), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err
