"""`compress quantize` on an MoE run: routed experts as int8/int4 codes by default."""

import json

import numpy as np
import pytest

from deepseek_tf.cli.main import main
from deepseek_tf.compress.quantization import quantize_model
from deepseek_tf.generation.generate import Generator
from deepseek_tf.rundir import RunDir, load_run


@pytest.fixture(scope="module")
def moe_run(shared_run):
    return shared_run("tiny-moe")  # read-only


def _routed_bytes(model):
    return sum(v.numpy().nbytes for v in model.weights if "/experts_" in v.path)


def _ids(model):
    return np.arange(24, dtype=np.int32)[None] % model.vocab_size


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_cli_quantizes_experts_by_default_and_the_run_reloads(moe_run, tmp_path, capsys):
    assert main(["compress", "quantize", str(moe_run), "--out", str(tmp_path / "q"),
                 "--quiet", "--mode", "int8"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "experts" in record["options"]["include"]
    assert "experts" in RunDir(tmp_path / "q").read_config().compression.quantize_include
    source, _ = load_run(moe_run)
    model, _ = load_run(tmp_path / "q")
    moes = model.moe_modules()
    assert moes and all(m.expert_quantize == "int8" for m in moes)  # MTP's included
    assert _routed_bytes(model) < _routed_bytes(source) / 3
    want, got = np.asarray(source(_ids(model))), np.asarray(model(_ids(model)))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert abs(record["val_loss_after"] - record["val_loss_before"]) < 0.05
    prompt = [int(t) for t in _ids(model)[0, :5]]
    new = Generator(model, jit_compile=False).generate([prompt], 6, temperature=0)[0]
    assert len(new) == 6 and all(0 <= t < model.vocab_size for t in new)


def test_int4_group_wise_experts_stay_close(moe_run):
    model, _ = load_run(moe_run)
    config = RunDir(moe_run).read_config()
    want = np.asarray(model(_ids(model)))
    before = _routed_bytes(model)
    quantize_model(model, config.model, "int4", include=("experts",), bits=4, group_size=8)
    assert _routed_bytes(model) < before / 3.5
    got = np.asarray(model(_ids(model)))
    assert 0 < np.abs(got - want).max() < 0.2 * np.abs(want).max()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "gptq", "--include", "experts"], "int8 or int4"),
        (["--mode", "int4", "--group-size", "12"], "must divide the experts' input widths"),
    ],
)
def test_expert_requests_that_cannot_work_are_refused(moe_run, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    assert main(["compress", "quantize", str(moe_run), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
