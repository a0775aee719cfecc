"""Greedy generation of a converted checkpoint (with its tokenizer) matches transformers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_model  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.convert import convert_from_hf, convert_to_hf  # noqa: E402
from deepseek_tf.generation.generate import Generator  # noqa: E402
from deepseek_tf.tokenizers import BPETokenizer  # noqa: E402

pytestmark = pytest.mark.hf

TEXT = "the quick brown fox jumps over the lazy dog; " * 4 + "pack my box with five dozen jugs."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint saved by transformers, with a BPE tokenizer.json beside it."""
    tokenizer = BPETokenizer.train([TEXT], 300)
    config = hf_config(vocab_size=tokenizer.vocab_size, n_group=2, topk_group=1)
    hf = hf_model(config, seed=2)
    hf_dir = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    return hf, hf_dir, tokenizer


def test_greedy_generation_matches_transformers(checkpoint, tmp_path):
    hf, hf_dir, tokenizer = checkpoint
    summary = convert_from_hf(hf_dir, tmp_path / "run")
    assert summary.tokenizer and (tmp_path / "run" / "tokenizer.json").is_file()
    model, loaded = deepseek_tf.load(tmp_path / "run")
    assert loaded.encode("the lazy fox") == tokenizer.encode("the lazy fox")
    prompt = loaded.encode("the quick brown")
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None
        )
    expected = out[0, len(prompt) :].tolist()
    assert len(expected) == 16
    assert Generator(model).generate([prompt], 16) == [expected]


def test_bpe_tokenizer_is_exported(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, hf_dir, tokenizer = checkpoint
    convert_from_hf(hf_dir, tmp_path / "run")
    summary = convert_to_hf(tmp_path / "run", tmp_path / "back", dtype="bfloat16")
    assert summary.tokenizer
    exported = BPETokenizer.load(str(tmp_path / "back" / "tokenizer.json"))
    assert exported.encode(TEXT) == tokenizer.encode(TEXT)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.model.layers[0].mlp.gate.weight.dtype == torch.float32  # router stays float32
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode(TEXT)[:20]])
    with torch.no_grad():
        got, want = back(ids).logits.float().numpy(), hf(ids).logits.numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # bfloat16 weights


def test_tokenizer_smaller_than_the_vocabulary_loads(tmp_path):
    tokenizer = BPETokenizer.train([TEXT], 270)
    hf = hf_model(hf_config(vocab_size=tokenizer.vocab_size + 8), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = deepseek_tf.load(tmp_path / "run")
    assert model.vocab_size == tokenizer.vocab_size + 8


def test_deepseek_tokenizer_settings_and_chat_template_travel_both_ways(tmp_path):
    """tokenizer_config.json (BOS/EOS, add_bos_token, chat template) survives --from-hf
    and --to-hf, and a chat reply generated greedily equals transformers' own."""
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
    from deepseek_style import write_deepseek_tokenizer

    hf_dir = write_deepseek_tokenizer(tmp_path / "hf")
    reference = AutoTokenizer.from_pretrained(hf_dir)
    hf = hf_model(hf_config(vocab_size=len(reference)), seed=4)
    hf.save_pretrained(hf_dir)
    convert_from_hf(hf_dir, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()
    model, tokenizer = deepseek_tf.load(tmp_path / "run")
    messages = [{"role": "user", "content": "What is the weather in Zürich?"}]
    ids = tokenizer.encode_chat(messages)
    expected_ids = reference.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == list(expected_ids["input_ids"])
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None)
    assert Generator(model).generate([ids], 8) == [out[0, len(ids) :].tolist()]

    convert_to_hf(tmp_path / "run", tmp_path / "back")
    again = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages)
    )
    assert again.eos_token == reference.eos_token and again.bos_token == reference.bos_token
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back").config.vocab_size == len(
        reference
    )


def test_chat_template_saved_by_transformers_5_travels_both_ways(tmp_path):
    """transformers 5 saves the template as chat_template.jinja: --from-hf reads it, and
    the run renders tool turns as transformers renders them; --to-hf writes it back."""
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
    from deepseek_style import write_deepseek_tokenizer
    from test_chat_template import CONVERSATIONS

    reference = AutoTokenizer.from_pretrained(write_deepseek_tokenizer(tmp_path / "src"))
    hf_dir = tmp_path / "hf"
    reference.save_pretrained(hf_dir)
    assert (hf_dir / "chat_template.jinja").is_file()
    assert "chat_template" not in (hf_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    hf_model(hf_config(vocab_size=len(reference)), seed=4).save_pretrained(hf_dir)
    convert_from_hf(hf_dir, tmp_path / "run")
    _, tokenizer = deepseek_tf.load(tmp_path / "run")
    convert_to_hf(tmp_path / "run", tmp_path / "back")
    again = AutoTokenizer.from_pretrained(tmp_path / "back")
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.apply_chat_template(messages) == expected
        assert (
            again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == expected
        )
