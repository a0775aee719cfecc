"""DeepSeek-V3's MTP module, stored as decoder layer `num_hidden_layers`, both ways."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_logits, hf_model, random_ids, rel_err  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.convert import CheckpointReader, convert_from_hf, convert_to_hf  # noqa: E402

pytestmark = pytest.mark.hf

N_LAYERS = 2
MTP = f"model.layers.{N_LAYERS}."


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """A V3 checkpoint with hand-added `model.layers.2.*` MTP tensors, as DeepSeek publishes."""
    overrides = dict(n_group=2, topk_group=1, first_k_dense_replace=1)
    hf = hf_model(hf_config(num_nextn_predict_layers=1, **overrides), seed=6)
    deeper = hf_model(hf_config(num_hidden_layers=N_LAYERS + 1, **overrides), seed=7)
    with torch.no_grad():  # a non-trivial final norm: MTP must read the state after it
        hf.model.norm.weight.copy_(1.0 + 0.5 * torch.randn(hf.config.hidden_size))
    root = tmp_path_factory.mktemp("mtp")
    hf.save_pretrained(root / "hf")
    deeper.save_pretrained(root / "deeper")
    tensors = load_file(root / "hf" / "model.safetensors")
    assert not any(k.startswith(MTP) for k in tensors)  # transformers saves no MTP weights
    block = load_file(root / "deeper" / "model.safetensors")
    rng = np.random.default_rng(0)
    d = hf.config.hidden_size
    mtp = {k: v for k, v in block.items() if k.startswith(MTP)}
    mtp.update(
        {
            MTP + "enorm.weight": rng.normal(1.0, 0.1, d).astype(np.float32),
            MTP + "hnorm.weight": rng.normal(1.0, 0.1, d).astype(np.float32),
            MTP + "eh_proj.weight": rng.normal(0.0, 0.1, (d, 2 * d)).astype(np.float32),
            MTP + "shared_head.norm.weight": rng.normal(1.0, 0.1, d).astype(np.float32),
            MTP + "shared_head.head.weight": tensors["lm_head.weight"],
            MTP + "embed_tokens.weight": tensors["model.embed_tokens.weight"],
        }
    )
    save_file({**tensors, **mtp}, root / "hf" / "model.safetensors", metadata={"format": "pt"})
    return hf, root, mtp


def test_mtp_layer_converts_into_mtp_module(mtp_checkpoint):
    hf, root, mtp = mtp_checkpoint
    summary = convert_from_hf(root / "hf", root / "run")
    assert summary.mtp_depth == 1
    model, _ = deepseek_tf.load(root / "run")
    module = model.mtp_modules[0]
    pairs = {
        "enorm.weight": module.enorm.scale,
        "hnorm.weight": module.hnorm.scale,
        "shared_head.norm.weight": module.norm.scale,
        "input_layernorm.weight": module.block.attn_norm.scale,
        "mlp.gate.e_score_correction_bias": module.block.ffn.gate.e_score_correction_bias,
    }
    for name, variable in pairs.items():
        np.testing.assert_array_equal(variable.numpy(), mtp[MTP + name], err_msg=name)
    linear = {
        "eh_proj.weight": module.eh_proj.kernel,
        "self_attn.kv_b_proj.weight": module.block.attention.kv_b_proj.kernel,
        "mlp.gate.weight": module.block.ffn.gate.kernel,
        "mlp.shared_experts.down_proj.weight": module.block.ffn.shared_experts.down_proj.kernel,
    }
    for name, variable in linear.items():
        np.testing.assert_array_equal(variable.numpy().T, mtp[MTP + name], err_msg=name)
    np.testing.assert_array_equal(
        module.block.ffn.experts_up.numpy()[6].T, mtp[MTP + "mlp.experts.6.up_proj.weight"]
    )
    ids = random_ids(hf.config.vocab_size, seed=8)
    assert rel_err(np.asarray(model(ids)), hf_logits(hf, ids)) < 1e-4  # main model unaffected
    _, stats = model.forward_with_stats(ids)
    assert stats["mtp_logits"][0].shape == (2, ids.shape[1] - 1, hf.config.vocab_size)


def test_mtp_module_is_exported_as_layer_n(mtp_checkpoint):
    from transformers import AutoModelForCausalLM

    hf, root, mtp = mtp_checkpoint
    convert_from_hf(root / "hf", root / "run2")
    convert_to_hf(root / "run2", root / "back")
    config = json.loads((root / "back" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    reader = CheckpointReader(root / "back")
    assert {k for k in reader.names() if k.startswith(MTP)} == set(mtp)
    for name, value in mtp.items():
        np.testing.assert_array_equal(reader.get(name), value, err_msg=name)
    back, info = AutoModelForCausalLM.from_pretrained(root / "back", output_loading_info=True)
    # transformers' DeepseekV3ForCausalLM has no MTP layer; it reports it as unexpected (it
    # ignores only layer 61, DeepSeek-V3's own MTP layer) and otherwise loads everything.
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(MTP) for k in info["unexpected_keys"])
    ids = random_ids(hf.config.vocab_size, seed=9)
    assert rel_err(hf_logits(back.eval(), ids), hf_logits(hf, ids)) < 1e-4


def test_transformers_checkpoint_without_mtp_weights_gets_no_mtp(tmp_path):
    hf = hf_model(hf_config(num_nextn_predict_layers=1), seed=8)
    hf.save_pretrained(tmp_path / "hf")
    summary = convert_from_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = deepseek_tf.load(tmp_path / "run")
    assert summary.mtp_depth == 0 and model.mtp_depth == 0


def _transformers_mtp_logits(root, ids):
    """Depth-1 MTP logits from transformers' own `MtpModel`, loaded from the checkpoint:
    the normed final state of the main model at `i` and the embedding of token `i + 1`
    at position `i + 1`."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    main = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").eval()
    # transformers finds MTP tensors by the main model's ignore patterns, which name
    # DeepSeek-V3's layer 61; this tiny checkpoint keeps its MTP layer at N_LAYERS.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{N_LAYERS}\..*"]
    mtp = MtpModel.from_pretrained(main).eval()
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    positions = torch.arange(1, ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        normed = main.model(ids_t).last_hidden_state  # (B, T, C), after the final norm
        h = mtp.forward_layer(0, normed[:, :-1], positions, None, input_ids=ids_t[:, 1:])
        return mtp._project_to_logits(h).float().numpy(), mtp


def test_mtp_logits_equal_transformers_mtp_layer(mtp_checkpoint):
    hf, root, mtp_tensors = mtp_checkpoint
    convert_from_hf(root / "hf", root / "run3")
    model, _ = deepseek_tf.load(root / "run3")
    ids = random_ids(hf.config.vocab_size, shape=(2, 16), seed=10)
    reference, mtp = _transformers_mtp_logits(root, ids)
    # transformers really loaded the checkpoint's MTP weights (not a fresh init).
    np.testing.assert_array_equal(
        mtp.layers[0].post_norm.weight.detach().numpy(),
        mtp_tensors[MTP + "shared_head.norm.weight"],
    )
    _, stats = model.forward_with_stats(ids)
    ours = np.asarray(stats["mtp_logits"][0])  # (B, T - 1, V)
    assert ours.shape == reference.shape
    assert rel_err(ours, reference) < 1e-4
    # The pre-norm state (the old convention) is measurably different with these
    # non-trivial norm weights: the test can tell the two apart.
    x = model.hidden_states(ids)
    embeddings = model.embed(ids, False)
    unnormed = model.project(model.mtp_modules[0](x[:, :-1], embeddings[:, 1:])["x"])
    assert rel_err(np.asarray(unnormed), reference) > 1e-2
