"""Total and activated parameter counts from a config, without allocating weights."""

from __future__ import annotations

from deepseek_tf.config.schema import Config
from deepseek_tf.models.builder import model_kwargs


def attention_params(kw: dict) -> int:
    d, att = kw["d_model"], kw["attention_config"]
    h = att["n_heads"]
    if kw["attention_type"] == "mla":
        qk = att["qk_nope_head_dim"] + att["qk_rope_head_dim"]
        q_rank, kv_rank = att["q_lora_rank"], att["kv_lora_rank"]
        query = d * q_rank + q_rank + q_rank * h * qk if q_rank else d * h * qk
        kv = d * (kv_rank + att["qk_rope_head_dim"]) + kv_rank
        kv += kv_rank * h * (att["qk_nope_head_dim"] + att["v_head_dim"])
        return query + kv + h * att["v_head_dim"] * d
    hkv, hd = att["n_kv_heads"], att["head_dim"]
    params = d * h * hd + 2 * d * hkv * hd + h * hd * d
    if "dynamic" in att["position"]:
        params += att["bias_buckets"] * h
    return params


def ffn_params(kw: dict, is_moe: bool) -> tuple[int, int]:
    """(total, activated) feed-forward parameters of one layer."""
    d = kw["d_model"]
    if not is_moe:
        dense = 3 * d * kw["ffn_hidden_dim"]
        return dense, dense
    moe = kw["moe_config"]
    expert = 3 * d * moe["moe_hidden_dim"]
    router = d * moe["n_routed_experts"] + moe["n_routed_experts"]  # kernel + balance bias
    shared = expert * moe["n_shared_experts"]
    total = router + shared + expert * moe["n_routed_experts"]
    return total, router + shared + expert * moe["num_experts_per_tok"]


def projection_shapes(kw: dict) -> dict:
    """`{"attention/q_proj": (in, out), "ffn/up_proj": ...}` of one layer's projections."""
    d, att = kw["d_model"], kw["attention_config"]
    h = att["n_heads"]
    if kw["attention_type"] == "mla":
        qk = att["qk_nope_head_dim"] + att["qk_rope_head_dim"]
        q_rank = att["q_lora_rank"]
        shapes = (
            {"q_a_proj": (d, q_rank), "q_b_proj": (q_rank, h * qk)}
            if q_rank
            else {"q_proj": (d, h * qk)}
        )
        shapes["kv_a_proj_with_mqa"] = (d, att["kv_lora_rank"] + att["qk_rope_head_dim"])
        shapes["o_proj"] = (h * att["v_head_dim"], d)
    else:
        hd, hkv = att["head_dim"], att["n_kv_heads"]
        shapes = {
            "q_proj": (d, h * hd),
            "k_proj": (d, hkv * hd),
            "v_proj": (d, hkv * hd),
            "o_proj": (h * hd, d),
        }
    f = kw["ffn_hidden_dim"]
    ffn = {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return {
        **{f"attention/{k}": v for k, v in shapes.items()},
        **{f"ffn/{k}": v for k, v in ffn.items()},
    }


def layer_kwargs(kw: dict, i: int) -> dict:
    """`kw` with layer `i`'s overrides (pruned widths) applied, as `CausalLM` does."""
    o = (kw.get("layer_overrides") or [{}] * kw["n_layers"])[i]
    moe = kw["moe_config"]
    return {
        **kw,
        "attention_config": {**kw["attention_config"], **o.get("attention", {})},
        "ffn_hidden_dim": o.get("ffn_hidden_dim", kw["ffn_hidden_dim"]),
        "moe_config": {**moe, **o.get("moe", {})} if moe else None,
        "projection_ranks": o.get("projection_ranks", {}),
    }


def block_params(kw: dict, block_type: str, is_moe: bool) -> tuple[int, int]:
    d = kw["d_model"]
    fixed = attention_params(kw) + 2 * d  # attention + two norms
    if block_type == "hybrid":
        fixed += kw["conv_kernel_size"] * d * d + d
    total, active = ffn_params(kw, is_moe)
    shapes = projection_shapes(kw)
    for name, rank in kw.get("projection_ranks", {}).items():  # low-rank factor pairs
        n_in, n_out = shapes[name]
        saved = n_in * n_out - rank * (n_in + n_out)
        if name.startswith("ffn/"):
            total, active = total - saved, active - saved
        else:
            fixed -= saved
    return fixed + total, fixed + active


def shared_params(kw: dict) -> int:
    """Parameters saved by `share_adjacent`: the second block of each pair reuses the first's."""
    mode, saved = kw["share_adjacent"], 0
    moe = kw["moe_layers"]
    for i in range(1, kw["n_layers"], 2):
        if mode in ("ffn", "both") and moe[i - 1] == moe[i]:
            saved += ffn_params(kw, moe[i])[0]
        if mode in ("attention", "both"):
            saved += attention_params(kw)
    return saved


def parameter_count(config: Config, vocab_size: int | None = None) -> dict:
    """Counts from the config alone (works for 671B-parameter shapes).

    `total` covers the inference model (embedding, blocks, final norm, head).
    `activated` is what one token computes with: only the routed experts it
    uses, and no input embedding table (a lookup, not a matmul) -- the
    convention of DeepSeek's published figures (V3 37B, V2 21B, V2-Lite 2.4B).
    `mtp` is the Multi-Token Prediction modules (they share embedding and head).
    """
    kw = model_kwargs(config, vocab_size)
    d, v = kw["d_model"], kw["vocab_size"]
    blocks = [
        block_params(layer_kwargs(kw, i), t, m)
        for i, (t, m) in enumerate(zip(kw["block_types"], kw["moe_layers"]))
    ]
    shared = shared_params(kw)
    embedding = v * d
    head = 0 if kw["tie_embeddings"] else v * d
    total = embedding + sum(b[0] for b in blocks) + d + head - shared
    activated = sum(b[1] for b in blocks) + d + (head or embedding)  # shared weights still run
    last = block_params(kw, kw["block_types"][-1], kw["moe_layers"][-1])
    mtp = kw["mtp_depth"] * (3 * d + 2 * d * d + last[0])  # 3 norms, eh_proj, block
    mtp_active = kw["mtp_depth"] * (3 * d + 2 * d * d + last[1])
    return {
        "total": total,
        "activated": activated,
        "embedding": embedding,
        "head": head,
        "non_embedding": total - embedding,
        "mtp": mtp,
        "mtp_activated": mtp_active,
        "total_with_mtp": total + mtp,
        "shared_saving": shared,
    }
