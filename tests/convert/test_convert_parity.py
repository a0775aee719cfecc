"""Logit parity with transformers' DeepSeek-V3/V2, and the round trip back to Hugging Face."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_logits, hf_model, random_ids, rel_err  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.convert import convert_from_hf, convert_to_hf  # noqa: E402

pytestmark = pytest.mark.hf

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale: the cos/sin factor and the softmax scale both move
}
CONFIGS = {
    # q_lora, 4 groups (2 used), a dense first layer, scaled and renormalised gates
    "v3-qlora-groups": dict(
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5
    ),
    # plain q_proj, yarn, no renormalisation, every layer MoE
    "v3-qproj-yarn": dict(q_lora_rank=None, norm_topk_prob=False, rope_parameters=YARN),
    # 2 groups (1 used) of 4, 3 experts per token, tied head
    "v3-k3-tied": dict(
        n_group=2,
        topk_group=1,
        num_experts_per_tok=3,
        routed_scaling_factor=1.5,
        tie_word_embeddings=True,
    ),
    # 3 layers, 2 dense, 2 shared experts, no renormalisation
    "v3-dense2-shared2": dict(
        num_hidden_layers=3,
        first_k_dense_replace=2,
        n_shared_experts=2,
        n_group=4,
        topk_group=3,
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
    ),
    "v2-greedy": dict(model_type="deepseek_v2", q_lora_rank=None, norm_topk_prob=False),
    "v2-group-limited-yarn": dict(
        model_type="deepseek_v2",
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        first_k_dense_replace=1,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def converted(request, tmp_path_factory):
    """(HF model, our loaded model, run dir) for one tiny config."""
    overrides = dict(CONFIGS[request.param])
    hf = hf_model(hf_config(overrides.pop("model_type", "deepseek_v3"), **overrides), seed=1)
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "hf")
    convert_from_hf(root / "hf", root / "run")
    model, tokenizer = deepseek_tf.load(root / "run")
    assert tokenizer is None  # save_pretrained wrote no tokenizer
    return hf, model, root


def test_logits_match_transformers(converted):
    hf, model, _ = converted
    ids = random_ids(hf.config.vocab_size, (2, 24), seed=3)
    expected = hf_logits(hf, ids)
    err = rel_err(np.asarray(model(ids)), expected)
    print(f"max relative logit error: {err:.2e}")
    assert err < 1e-4


def test_round_trip_to_transformers(converted):
    from transformers import AutoModelForCausalLM

    hf, _, root = converted
    convert_to_hf(root / "run", root / "back")
    back, info = AutoModelForCausalLM.from_pretrained(
        root / "back", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    assert type(back) is type(hf)
    ids = random_ids(hf.config.vocab_size, (2, 24), seed=4)
    err = rel_err(hf_logits(back.eval(), ids), hf_logits(hf, ids))
    print(f"round-trip relative logit error: {err:.2e}")
    assert err < 1e-4
