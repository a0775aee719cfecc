"""Exported GGUF files run by llama.cpp itself (llama-cpp-python, built from its source
distribution: `pip install llama-cpp-python`, 15-25 minutes on 2 cores; marker `llamacpp`).

llama.cpp's greedy tokens equal deepseek-tf's (a float32 file: the same weights) for a
`shakespeare-moe` run and for a converted DeepSeek-V2-style checkpoint (softmax routing,
no q-LoRA, YaRN, a BPE tokenizer); q8_0 logits stay within a stated tolerance.
"""

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from serving_helpers import forward_greedy  # noqa: E402  (the plain greedy reference)

from deepseek_tf.api import convert_from_hf, convert_to_hf, load  # noqa: E402
from deepseek_tf.api.deployment import export  # noqa: E402
from deepseek_tf.export.gguf_verify import llama_greedy, llama_logits, open_llama  # noqa: E402

pytestmark = pytest.mark.llamacpp

MOE = ("train.steps=60", "train.eval_every=0", "train.keep_best=false")
# a DeepSeek-V2-Lite-style model at test size, trained briefly, written as a Hugging Face
# checkpoint and converted back (`convert --from-hf`)
V2 = (
    "model.blocks=[attention]",
    "model.q_lora_rank=0",
    "model.scoring_func=softmax",
    "model.topk_method=greedy",
    "model.norm_topk_prob=false",
    "model.n_group=1",
    "model.topk_group=1",
    "model.scale_embeddings=false",
    "model.mtp_depth=0",
    "model.rope_scaling_factor=4.0",
    "model.rope_original_max_len=12",
    "model.yarn_mscale=0.707",
    "model.yarn_mscale_all_dim=0.707",
    "data.tokenizer=bpe",
    "data.vocab_size=300",
    "train.steps=20",
    "train.eval_every=0",
)


@pytest.fixture(scope="module")
def moe_run(shared_run):
    return shared_run("shakespeare-moe", MOE)


@pytest.fixture(scope="module")
def converted_run(shared_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    convert_to_hf(shared_run("tiny-moe", V2), out=root / "hf")
    convert_from_hf(root / "hf", out=root / "run")
    return root / "run"


def _greedy_matches(run, tmp_path, prompt: str, n: int):
    model, tokenizer = load(run)
    path = tmp_path / "m.gguf"
    report = export(run, format="gguf", out=path, quant="f32")
    ids = tokenizer.encode(prompt)
    llm = open_llama(path, n_ctx=model.max_seq_len)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    return report, llama_greedy(llm, ids, n), forward_greedy(model, [ids], n)[0]


def test_llama_cpp_greedy_equals_deepseek_tf_on_a_shakespeare_moe_run(moe_run, tmp_path):
    report, got, want = _greedy_matches(moe_run, tmp_path, "ROMEO:\nWhat", 40)
    assert got == want
    assert report["argmax_agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-3


def test_llama_cpp_greedy_equals_deepseek_tf_on_a_converted_checkpoint(converted_run, tmp_path):
    report, got, want = _greedy_matches(converted_run, tmp_path, "The king said", 20)
    assert got == want
    assert report["max_abs_logit_diff"] < 1e-3


def test_q8_0_logits_within_tolerance(moe_run, tmp_path):
    model, tokenizer = load(moe_run)
    path = tmp_path / "q8.gguf"
    export(moe_run, format="gguf", out=path, quant="q8_0")
    ids = tokenizer.encode("KING RICHARD III:\nNow is the winter of our discontent")
    got = llama_logits(open_llama(path, n_ctx=model.max_seq_len), ids)
    want = np.asarray(model(np.asarray([ids], np.int32), training=False))[0]
    # stated tolerance (llama.cpp's q8_0 products quantise the activations too): each
    # position's logits within 5% of their range, mean KL(keras || llama.cpp) <= 1e-3
    # nats, argmax agreeing on >= 95% of positions
    span = want.max(-1) - want.min(-1)
    assert np.all(np.max(np.abs(got - want), -1) <= 0.05 * span)
    p, q = _softmax(want), _softmax(got)
    assert np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)) <= 1e-3
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
