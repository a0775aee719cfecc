"""LoRA fine-tuning of a Hugging Face checkpoint: merged by `convert --to-hf`, or written
alone in PEFT's layout; both compute what the fine-tuned run computes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_model, rel_err  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.cli.main import main  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import write_deepseek_tokenizer  # noqa: E402

pytestmark = pytest.mark.hf

TRAIN = [
    *("--set", "train.steps=3", "--set", "train.eval_every=0", "--set", "train.warmup_steps=0"),
    *("--set", "train.learning_rate=0.05", "--set", "train.batch_size=2"),
    *("--set", "data.seq_len=32", "--sample-tokens", "0"),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = write_deepseek_tokenizer(tmp_path_factory.mktemp("lora") / "hf")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(root))
    hf_model(hf_config(vocab_size=vocab, n_group=2, topk_group=1), seed=11).save_pretrained(root)
    return root


def _fine_tune(hf_dir, out, targets):
    lora = ["--set", "train.lora_rank=2", "--set", f"train.lora_targets=[{targets}]"]
    assert main(["train", "--init-from", str(hf_dir), "--out", str(out), *TRAIN, *lora]) == 0
    model, tokenizer = deepseek_tf.load(out)
    ids = np.asarray([tokenizer.encode("The weather in Zürich is sunny today.")], np.int32)
    return model, ids


def test_merged_export_equals_the_fine_tuned_run(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids = _fine_tune(hf_dir, tmp_path / "run", "attention,shared_experts,experts")
    ours = np.asarray(model(ids))
    base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        before = base(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel_err(ours, before) > 1e-3  # the adapters changed the function
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = merged(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel_err(got, ours) < 1e-4


def test_peft_loads_the_adapter_and_computes_the_same(hf_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, ids = _fine_tune(hf_dir, tmp_path / "run", "attention")
    out = tmp_path / "adapter"
    args = ["convert", "--to-hf", str(tmp_path / "run"), "--out", str(out), "--adapter-only"]
    assert main(args) == 0
    assert "PEFT LoRA adapter" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == str(hf_dir)
    assert "kv_b_proj" in config["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = adapted(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel_err(got, np.asarray(model(ids))) < 1e-4


def test_adapter_only_needs_adapters(hf_dir, tmp_path, capsys):
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    args = ["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "a")]
    assert main([*args, "--adapter-only"]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err
