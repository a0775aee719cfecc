"""config.json <-> Config: the published DeepSeek configs, round trips, what cannot convert."""

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from deepseek_tf.config.loader import apply_overrides, load_config  # noqa: E402
from deepseek_tf.convert import config_from_hf, hf_config_from  # noqa: E402
from deepseek_tf.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.hf

# Hugging Face deepseek-ai/DeepSeek-V3 config.json (transformers 4 layout; auto_map dropped)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# Hugging Face deepseek-ai/DeepSeek-V2-Lite config.json
DEEPSEEK_V2_LITE = {
    **{k: DEEPSEEK_V3[k] for k in ("attention_bias", "hidden_act", "rms_norm_eps", "rope_theta")},
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "aux_loss_alpha": 0.001,
    "first_k_dense_replace": 1,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707},
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "v_head_dim": 128,
    "vocab_size": 102400,
}
# deepseek-tf training settings the presets choose and a config.json does not carry
TRAINING_ONLY = {"seq_aux_loss_alpha", "mtp_loss_weight", "init_std"}
MOE_FIELDS = {
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_ffn_dim",
    "first_k_dense_replace",
    "moe_layer_freq",
    "scoring_func",
    "topk_method",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "bias_update_speed",
    "seq_aux_loss_alpha",
}


def relevant(model_config) -> dict:
    """The fields config.json carries (a dense model ignores the MoE ones)."""
    fields = dataclasses.asdict(model_config)
    fields.pop("bias_update_speed")  # a training setting (0 for routers without a bias)
    if not model_config.n_routed_experts:
        fields = {k: v for k, v in fields.items() if k not in MOE_FIELDS}
    return fields


@pytest.mark.parametrize(
    "hf, preset",
    [(DEEPSEEK_V3, "deepseek-v3"), (DEEPSEEK_V2_LITE, "deepseek-v2-lite")],
    ids=["v3", "v2-lite"],
)
def test_published_configs_map_to_the_presets(hf, preset):
    ours = dataclasses.asdict(config_from_hf(hf).model)
    expected = dataclasses.asdict(load_config(preset).model)
    assert (ours.pop("dtype"), expected.pop("dtype")) == ("float32", "")  # how a run loads
    diff = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert set(diff) <= TRAINING_ONLY, diff
    bf16 = config_from_hf(hf, precision="bfloat16")
    assert bf16.model.dtype == bf16.train.precision == "bfloat16"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.q_lora_rank=0", "model.tie_embeddings=true", "model.mtp_depth=0"],
        ["model.n_routed_experts=0"],
        ["model.topk_method=greedy", "model.n_group=1", "model.topk_group=1"],
    ],
)
def test_hf_config_round_trips(overrides):
    from transformers import AutoConfig

    config = apply_overrides(config_from_hf(DEEPSEEK_V3), overrides)
    hf = hf_config_from(config)
    assert relevant(config_from_hf(hf).model) == relevant(config.model)
    # transformers accepts it as its own config class
    parsed = AutoConfig.for_model(**hf)
    assert parsed.model_type == hf["model_type"] == "deepseek_v3"


def test_v2_round_trip_and_transformers_parses_it():
    from transformers import AutoConfig

    config = config_from_hf(DEEPSEEK_V2_LITE)
    hf = hf_config_from(config)
    assert hf["model_type"] == "deepseek_v2" and hf["q_lora_rank"] is None
    assert config_from_hf(hf).model == config.model
    parsed = AutoConfig.for_model(**hf)
    assert parsed.rope_parameters["rope_type"] == "yarn" and parsed.rope_parameters["factor"] == 40


def test_yarn_without_mscale_keeps_transformers_semantics():
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    m = config_from_hf({**DEEPSEEK_V3, "rope_scaling": rope, "max_position_embeddings": 64}).model
    assert (m.rope_scaling_factor, m.rope_original_max_len) == (4.0, 16)
    assert m.yarn_mscale == 0.0 and m.yarn_mscale_all_dim == 0.0  # attention factor mscale(4)
    new_style = {"rope_type": "yarn", "rope_theta": 500.0, "original_max_position_embeddings": 16}
    m = config_from_hf({**DEEPSEEK_V3, "rope_parameters": new_style, "max_position_embeddings": 64})
    assert m.model.rope_theta == 500.0 and m.model.rope_scaling_factor == 4.0  # 64 / 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not a DeepSeek V2/V3 architecture"),
        ({"kv_lora_rank": None}, "missing required field 'kv_lora_rank'"),
        ({"hidden_size": "7168"}, "hidden_size must be int, got '7168'"),
        ({"norm_topk_prob": 1}, "norm_topk_prob must be bool"),
        ({"topk_method": "best"}, "model.topk_method: 'best' is not one of"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"n_group": 3}, "n_group: 3 does not divide"),
    ],
)
def test_bad_config_json_is_one_line_config_error(change, message):
    hf = {**DEEPSEEK_V3, **change}
    hf = {k: v for k, v in hf.items() if v is not None or k == "q_lora_rank"}
    with pytest.raises(ConfigError) as e:
        config_from_hf(hf)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("config.json: ")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.attention=mha"], "model.attention"),
        (["model.scale_embeddings=true"], "model.scale_embeddings"),
        (["model.moe_layer_freq=2"], "model.moe_layer_freq"),
        (["model.scoring_func=softmax", "model.topk_method=greedy"], "model.norm_topk_prob"),
        (["model.scoring_func=softmax"], "model.topk_method"),
        (["calibration.logit_temperature=1.5"], "calibration.logit_temperature: 1.5"),
        (["compression.quantize=int8"], "compression.quantize: 'int8'"),
    ],
)
def test_models_without_a_transformers_equivalent_are_refused(overrides, key):
    config = apply_overrides(config_from_hf(DEEPSEEK_V3), overrides)
    with pytest.raises(ConfigError, match=key):
        hf_config_from(config)
