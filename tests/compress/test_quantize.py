"""`deepseek-tf compress quantize`: Keras int8/int4/GPTQ/AWQ on a trained tiny run."""

import json

import numpy as np
import pytest

from deepseek_tf.cli.main import main
from deepseek_tf.rundir import load_run

PROMPT = "ROMEO: what light"


def quantize(run, out, *args):
    return main(["compress", "quantize", str(run), "--out", str(out), "--quiet", *args])


class _Runs(dict):
    """`{mode: run_dir}` of the shared tiny run, each mode quantized when first asked for
    (the calibrated modes only in the `slow` tests that use them)."""

    def __init__(self, source, root):
        super().__init__()
        self.source, self.root = source, root

    def __missing__(self, mode):
        extra = ["--calibration-samples", "16"] if mode in ("gptq", "awq") else []
        assert quantize(self.source, self.root / mode, "--mode", mode, *extra) == 0
        self[mode] = self.root / mode
        return self[mode]


@pytest.fixture(scope="module")
def quantized(trained_run, tmp_path_factory):
    return _Runs(trained_run, tmp_path_factory.mktemp("quantized"))


def logits(run_dir, ids):
    model, _ = load_run(run_dir)
    return np.asarray(model(ids))


@pytest.fixture(scope="module")
def probe(loaded):
    model, tokenizer = loaded
    ids = np.asarray([tokenizer.encode(PROMPT)], np.int32)
    return ids, np.asarray(model(ids))


def test_int8_weights_are_int8_and_logits_stay_close(quantized, probe):
    model, _ = load_run(quantized["int8"])
    q_proj = model.blocks[0].attention.q_proj
    assert q_proj.quantization_mode == "int8"
    assert q_proj._kernel.dtype == "int8"
    ids, reference = probe
    diff = np.abs(np.asarray(model(ids)) - reference).max()
    assert 0 < diff < 0.02 * np.abs(reference).max()  # changed, but within 2% of the range


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_int4_packs_weights_and_loses_more_than_int8(quantized, probe):
    ids, reference = probe
    err8 = np.abs(logits(quantized["int8"], ids) - reference).max()
    err4 = np.abs(logits(quantized["int4"], ids) - reference).max()
    model, _ = load_run(quantized["int4"])
    kernel = model.blocks[0].ffn.up_proj._kernel
    assert kernel.shape[-1] == 64 // 2  # two 4-bit values per byte
    assert err4 > err8


@pytest.mark.slow
def test_gptq_sees_activations_and_beats_keras_unpatched_gptq(trained_run, quantized):
    # Keras 3.15 alone: quantized layers run `quantized_call`, its Hessian hooks on `call`
    # never fire and GPTQ is round-to-nearest. deepseek-tf routes the calls; its GPTQ must
    # fit the calibration data better than the unpatched run.
    from deepseek_tf.compress import quantization as q
    from deepseek_tf.models.quantization import quantization_config
    from deepseek_tf.rundir import RunDir

    config = RunDir(trained_run).read_config()
    reference, tokenizer = load_run(trained_run)
    calibration = q.calibration_tokens(config, tokenizer, 16)

    ours, _ = load_run(trained_run)
    q.quantize_model(
        ours,
        config.model,
        "gptq",
        include=q.INCLUDE[:2],
        bits=4,
        group_size=128,
        dataset=calibration,
    )
    unpatched, _ = load_run(trained_run)
    cfg = quantization_config("gptq", 4, 128, calibration, calibration.shape[-1])
    cfg.quantization_layer_structure = q.layer_structure(unpatched)
    chosen = {id(layer) for layer in unpatched.quantizable_layers(q.INCLUDE[:2])}
    unpatched.quantize("gptq", config=cfg, filters=lambda layer: id(layer) in chosen)

    # GPTQ minimises each layer's output error on the calibration inputs: compare it where
    # both models see the same inputs, block 0's query/key/value projections.
    hidden = reference.blocks[0].attn_norm(reference.embed(calibration))  # (16, T, C)

    def error(model):  # summed over block 0's query, key and value projections
        return sum(
            np.mean((np.asarray(getattr(model.blocks[0].attention, n)(hidden)) - target) ** 2)
            for n, target in targets.items()
        )

    attention = reference.blocks[0].attention
    targets = {n: np.asarray(getattr(attention, n)(hidden)) for n in ("q_proj", "k_proj", "v_proj")}
    assert error(ours) < 0.9 * error(unpatched)
    saved, _ = load_run(quantized["gptq"])
    assert saved.blocks[1].ffn.down_proj.is_gptq_calibrated


@pytest.mark.slow
def test_awq_run_loads_and_records_history(quantized, probe, capsys):
    ids, reference = probe
    assert np.abs(logits(quantized["awq"], ids) - reference).max() < 0.1 * np.abs(reference).max()
    assert main(["info", str(quantized["awq"])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    entry = [x["compression"] for x in lines if "compression" in x][-1]
    assert entry["method"] == "quantize" and entry["options"]["mode"] == "awq"
    assert entry["bytes_after"] < entry["bytes_before"]


@pytest.mark.slow
def test_quantized_run_evaluates_generates_and_exports(quantized, tmp_path, capsys):
    run = str(quantized["int8"])
    assert main(["eval", run, "--max-batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    assert main(["generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["export", run, "--format", "savedmodel", "--out", str(tmp_path / "sm")]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "int4", "--include", "attention,experts"], "routed experts"),
        (["--mode", "int8", "--include", "head"], "tied embedding"),
        (["--mode", "awq", "--bits", "8"], "AWQ supports 4-bit"),
        (["--mode", "int4", "--include", "conv"], "unknown"),
    ],
)
def test_incompatible_requests_fail_before_any_work(trained_run, tmp_path, capsys, args, message):
    assert quantize(trained_run, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
