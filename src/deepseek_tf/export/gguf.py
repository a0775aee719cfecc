"""GGUF export for llama.cpp / Ollama: llama.cpp's `deepseek2` architecture.

The model's Hugging Face form (`convert.weight_map`: names and layouts;
`convert.hf_config.hf_config_from`: the hyperparameters, and the refusal of
models DeepSeek cannot express) is written in GGUF's, with the `gguf` package
(llama.cpp's own writer and quantizers): tensor names from its DeepSeek-2 name
map; the routed experts as one `(E, out, in)` tensor per projection; MLA's
`kv_b_proj` split into `attn_k_b` (transposed, for the absorbed attention) and
`attn_v_b`, as llama.cpp reads it; a tied output head left to llama.cpp's
duplicate of `token_embd`. Embeddings scaled by `sqrt(d_model)`
(`model.scale_embeddings`, which DeepSeek checkpoints do not do) are written
scaled as `token_embd`, with the unscaled matrix as the `output` head. MTP
modules are not written (llama.cpp's converter drops them too).

Types (`quant`): `bf16`, `q8_0` or `q4_0` for every matrix whose rows divide
into 32-value blocks (others bf16); norms, the router and its bias stay float32
(as llama.cpp's converter keeps them). `f32` writes every tensor in float32.

>>> from deepseek_tf.rundir import load_run                               # doctest: +SKIP
>>> model, tokenizer = load_run("runs/moe")                              # doctest: +SKIP
>>> export_gguf(model, config, "moe.gguf", tokenizer, quant="q8_0")      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deepseek_tf.config.loader import update_config
from deepseek_tf.convert.hf_config import hf_config_from
from deepseek_tf.errors import ConfigError, DeepSeekTFError
from deepseek_tf.export.gguf_tensors import encode, hf_tensors, plan_tensors
from deepseek_tf.export.gguf_verify import verify_gguf
from deepseek_tf.export.gguf_vocab import add_vocab
from deepseek_tf.models.lora import merge_lora

QUANTS = ("f32", "bf16", "q8_0", "q4_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise DeepSeekTFError(
            "GGUF export needs the gguf package: pip install 'deepseek-tf[export]'"
        ) from None
    return gguf


def _check_gguf(config) -> None:
    """Refuses what llama.cpp's deepseek2 cannot run the way this model does."""
    m = config.model
    grouped = m.topk_method == "group_limited_greedy" and m.topk_group < m.n_group
    if m.n_routed_experts and grouped:
        raise ConfigError(
            f"model.topk_method: {m.topk_method!r} cannot be exported to GGUF (llama.cpp ranks "
            "expert groups by their two best scores, as noaux_tc does, not by the best one)"
        )


def _add_hparams(writer, hf: dict, gguf) -> None:
    """DeepSeek-2 hyperparameters from the Hugging Face config of the model."""
    kv, rope_dim = hf["kv_lora_rank"], hf["qk_rope_head_dim"]
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(1)  # MLA is multi-query attention over the latent
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_vocab_size(hf["vocab_size"])
    writer.add_leading_dense_block_count(hf["first_k_dense_replace"])
    writer.add_q_lora_rank(hf["q_lora_rank"] or 0)  # 0: a plain q_proj (attn_q)
    writer.add_kv_lora_rank(kv)
    writer.add_key_length(kv + rope_dim)
    writer.add_value_length(kv)
    writer.add_key_length_mla(hf["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(hf["v_head_dim"])
    writer.add_rope_dimension_count(rope_dim)
    rope = hf["rope_parameters"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        # llama.cpp divides this key by 0.1 when it reads it (its converter's convention)
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope.get("mscale_all_dim", 0.0))
    n_experts = hf["n_routed_experts"]
    if not n_experts:
        writer.add_expert_feed_forward_length(hf["intermediate_size"])
        writer.add_expert_shared_count(0)
        return
    writer.add_expert_count(n_experts)
    writer.add_expert_used_count(hf["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    writer.add_expert_shared_count(hf["n_shared_experts"])
    writer.add_expert_weights_scale(hf["routed_scaling_factor"])
    writer.add_expert_weights_norm(bool(hf["norm_topk_prob"]))
    sigmoid = hf["scoring_func"] == "sigmoid"
    gating = gguf.ExpertGatingFuncType
    writer.add_expert_gating_func(gating.SIGMOID if sigmoid else gating.SOFTMAX)
    writer.add_expert_group_count(hf["n_group"])
    writer.add_expert_group_used_count(hf["topk_group"])


def export_gguf(
    model, config, out_path, tokenizer=None, *, quant: str = "bf16", verify: bool = True
) -> dict:
    """Writes `out_path` (.gguf) for llama.cpp's deepseek2; verified by reading it back.

    Args:
        model: a DeepSeek-shaped `CausalLM` (LoRA adapters are merged into it).
        config: its run `Config` (the hyperparameters).
        out_path: the file to write (replaced atomically).
        tokenizer: the run's tokenizer (`gguf_vocab.add_vocab`).
        quant: `f32`, `bf16`, `q8_0` or `q4_0` (see the module docstring).
        verify: read the file back and compare every tensor with the model's (and,
            where `llama-cpp-python` is installed, llama.cpp's logits with Keras').

    Returns:
        `format`, `path`, `signatures`, `quant`, `bytes`, `tensors`, `tokenizer` and,
        verified, `max_rel_weight_error` (and `max_abs_logit_diff`, `argmax_agreement`).

    Raises:
        ConfigError: a model llama.cpp cannot express (the message names the key).
        InputError: a tokenizer llama.cpp cannot express.
    """
    gguf = _gguf()
    if quant not in QUANTS:
        raise ConfigError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    # scaled embeddings are written scaled (see above); nothing else DeepSeek lacks is
    unscaled = update_config(config, model={"scale_embeddings": False})
    hf = hf_config_from(unscaled, model.vocab_size)
    _check_gguf(config)
    if config.train.lora_rank:  # the adapters become part of the plain weights
        merge_lora(model)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    try:
        writer.add_name(out_path.stem)
        _add_hparams(writer, hf, gguf)
        file_types = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(getattr(gguf.LlamaFileType, file_types.get(quant, "MOSTLY_Q4_0")))
        tokenizer_model = add_vocab(writer, tokenizer, model.vocab_size)
        plan = plan_tensors(model, hf, quant)
        for name, shape, qtype in plan:
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                nbytes = int(np.prod(byte_shape))
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, _, qtype), (_, array) in zip(plan, hf_tensors(model, hf)):
            writer.write_tensor_data(encode(array, qtype))
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    report = {
        "format": "gguf",
        "path": str(out_path),
        "signatures": ["llama.cpp deepseek2"],
        "quant": quant,
        "bytes": out_path.stat().st_size,
        "tensors": len(plan),
        "tokenizer": tokenizer_model,
    }
    if verify:
        report.update(verify_gguf(model, hf, out_path))
    return report
