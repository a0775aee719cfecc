"""GGUF export (llama.cpp's deepseek2): the file read back with the `gguf` package, checked
against the Keras variables by the test's own reshapes; its vocabularies; its refusals.
llama.cpp itself runs the files in tests/export/test_gguf_llama_cpp.py (marker `llamacpp`)."""

import gguf
import numpy as np
import pytest

from deepseek_tf.api import load
from deepseek_tf.api.deployment import export
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import load_config
from deepseek_tf.errors import ConfigError, InputError
from deepseek_tf.export.gguf_vocab import add_vocab
from deepseek_tf.tokenizers.bpe import BPETokenizer

# tiny-moe without its hybrid block (DeepSeek has none): MLA with q-LoRA, group-limited
# sigmoid routing after one dense layer, scaled embeddings, an untied head, one MTP module
MOE = ("model.blocks=[attention]", "train.steps=2", "train.eval_every=0")


@pytest.fixture(scope="module")
def moe_run(shared_run):
    return shared_run("tiny-moe", MOE)


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        value = field.contents()
        out[name] = value
    return out


@pytest.fixture(scope="module")
def f32_file(moe_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "moe.gguf"
    report = export(moe_run, format="gguf", out=path, quant="f32")
    return path, report


def test_gguf_holds_the_models_hyperparameters_and_char_vocab(moe_run, f32_file):
    path, report = f32_file
    config = load_config("tiny-moe", overrides=list(MOE))
    m = config.model
    fields = _fields(gguf.GGUFReader(path))
    assert fields["general.architecture"] == "deepseek2"
    expected = {
        "block_count": m.n_layers,
        "embedding_length": m.d_model,
        "attention.head_count": m.n_heads,
        "attention.q_lora_rank": m.q_lora_rank,
        "attention.kv_lora_rank": m.kv_lora_rank,
        "attention.key_length_mla": m.qk_nope_head_dim + m.qk_rope_head_dim,
        "rope.dimension_count": m.qk_rope_head_dim,
        "leading_dense_block_count": m.first_k_dense_replace,
        "expert_count": m.n_routed_experts,
        "expert_used_count": m.num_experts_per_tok,
        "expert_shared_count": m.n_shared_experts,
        "expert_group_count": m.n_group,
        "expert_group_used_count": m.topk_group,
        "expert_gating_func": 2,  # sigmoid
    }
    for key, value in expected.items():
        assert fields[f"deepseek2.{key}"] == value, key
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(m.routed_scaling_factor)
    _, tokenizer = load(moe_run)
    assert fields["tokenizer.ggml.model"] == "rwkv"
    want = [c.replace("\\", "\\\\").replace("\n", "\\n") for c in tokenizer.chars]
    assert fields["tokenizer.ggml.tokens"][: len(want)] == want
    assert report["max_rel_weight_error"] == 0.0  # f32: the very values
    assert not any(".nextn." in t.name or "blk.3." in t.name for t in gguf.GGUFReader(path).tensors)


def test_gguf_tensors_are_the_keras_variables_in_llama_cpp_layout(moe_run, f32_file):
    path, _ = f32_file
    model, _ = load(moe_run)
    config = load_config("tiny-moe", overrides=list(MOE))
    m = config.model
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    attn = model.blocks[1].attention
    # kv_b (kv_lora, H * (nope + v)) -> k_b (H, kv_lora, nope), v_b (H, v, kv_lora)
    kv_b = attn.kv_b_proj.kernel.numpy().reshape(m.kv_lora_rank, m.n_heads, -1)
    np.testing.assert_array_equal(
        tensors["blk.1.attn_k_b.weight"], kv_b[:, :, : m.qk_nope_head_dim].transpose(1, 0, 2)
    )
    np.testing.assert_array_equal(
        tensors["blk.1.attn_v_b.weight"], kv_b[:, :, m.qk_nope_head_dim :].transpose(1, 2, 0)
    )
    moe = model.blocks[1].ffn
    np.testing.assert_array_equal(  # keras (E, in, out) -> GGUF rows (E, out, in)
        tensors["blk.1.ffn_down_exps.weight"], moe.experts_down.numpy().transpose(0, 2, 1)
    )
    np.testing.assert_array_equal(
        tensors["blk.1.exp_probs_b.bias"], moe.gate.e_score_correction_bias.numpy()
    )
    embedding = model.embedding.embeddings.numpy()
    np.testing.assert_allclose(  # scaled embeddings are written scaled
        tensors["token_embd.weight"], embedding * np.sqrt(m.d_model), rtol=1e-6
    )
    np.testing.assert_array_equal(tensors["output.weight"], model.lm_head.kernel.numpy().T)
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors


@pytest.mark.parametrize(("quant", "tolerance"), [("bf16", 0.005), ("q8_0", 0.01), ("q4_0", 0.2)])
def test_gguf_quant_types_and_their_error(moe_run, tmp_path, quant, tolerance):
    report = export(moe_run, format="gguf", out=tmp_path / "m.gguf", quant=quant)
    assert 0 < report["max_rel_weight_error"] < tolerance
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.1.attn_norm.weight"] == "F32" and types["blk.1.ffn_gate_inp.weight"] == "F32"
    # rows of 32 values quantise; the 16-wide expert rows of this tiny model stay bf16
    assert types["blk.1.attn_kv_a_mqa.weight"] == quant.upper()
    assert types["blk.1.ffn_down_exps.weight"] == "BF16"


def test_bpe_vocab_keeps_tokens_merges_and_names_the_pre_tokenizer(tmp_path):
    text = ["The quick brown fox jumps over the lazy dog. " * 20, "ROMEO: hello world\n" * 20]
    tokenizer = BPETokenizer.train(text, vocab_size=300, log=lambda _: None)
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "deepseek2")
    assert add_vocab(writer, tokenizer, 320) == "gpt2"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = _fields(gguf.GGUFReader(tmp_path / "v.gguf"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(tokens) == 320
    vocab = tokenizer.hf_tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[319] == "[PAD319]"
    assert len(fields["tokenizer.ggml.merges"]) == vocab_merges(tokenizer)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id


def vocab_merges(tokenizer) -> int:
    import json

    return len(json.loads(tokenizer.hf_tokenizer.to_str())["model"]["merges"])


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = BPETokenizer.train(["abc abd " * 50], vocab_size=270, log=lambda _: None)
    tokenizer.hf_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "deepseek2")
    with pytest.raises(InputError, match="pre-tokenizer \\(Whitespace\\) has no llama.cpp"):
        add_vocab(writer, tokenizer, 270)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"format": "gguf", "quant": "q5_k"}, "--quant 'q5_k': choose one of f32, bf16"),
        ({"format": "onnx", "quant": "q8_0"}, "--quant is only for --format gguf"),
    ],
)
def test_gguf_options_are_checked_before_loading(tmp_path, options, match):
    with pytest.raises(InputError, match=match):
        export(tmp_path / "nowhere", out=tmp_path / "m.gguf", **options)


def test_a_model_llama_cpp_cannot_run_is_one_line(trained_run, tmp_path, capsys):
    out = tmp_path / "t.gguf"  # the tiny run: grouped-query attention, not MLA
    assert main(["export", str(trained_run), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.attention: ") and "\n" not in err
    assert not out.exists() and not out.with_name("t.gguf.tmp").exists()


def test_group_limited_greedy_is_refused(moe_run, tmp_path):
    from deepseek_tf.config.loader import update_config
    from deepseek_tf.export.gguf import export_gguf

    model, tokenizer = load(moe_run)
    config = load_config("tiny-moe", overrides=list(MOE))
    config = update_config(
        config,
        model={
            "scoring_func": "softmax",
            "topk_method": "group_limited_greedy",
            "norm_topk_prob": False,
        },  # fmt: skip
    )
    with pytest.raises(ConfigError, match="model.topk_method: 'group_limited_greedy'"):
        export_gguf(model, config, tmp_path / "m.gguf", tokenizer)
