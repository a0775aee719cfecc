"""What a `CausalLM` declares about itself, from its constructor arguments alone: parameter
counts, the projections quantization converts, the units pruning removes, the KV-cache
size. It works on an unbuilt model, so a 671B-parameter shape describes itself without a
weight allocated; every value comes from the layers' own declarations
(`layers.structure`).
"""

from __future__ import annotations

import keras

from deepseek_tf.layers.low_rank_dense import LowRankDense


class ModelStructure:
    """Mixin of `CausalLM`: its self-description (see the module docstring)."""

    def parameter_counts(self) -> dict:
        """Parameter counts from the layers' own declarations, without any weights.

        `total` covers the inference model (embedding, blocks, final norm, head); a
        sublayer shared by adjacent blocks counts once (`shared_saving` is what sharing
        saves). `activated` is what one token computes with: only the routed experts it
        uses and no input embedding table (a lookup, not a matmul) -- the convention of
        DeepSeek's published figures (V3 37B, V2 21B, V2-Lite 2.4B). `mtp` is the
        Multi-Token Prediction modules (they share the embedding and the head).
        """
        d, v = self.d_model, self.vocab_size
        counted: set = set()
        blocks = [block.parameter_counts(counted) for block in self.blocks]
        unshared = sum(block.parameter_counts()[0] for block in self.blocks)
        embedding = v * d
        head = 0 if self.tie_embeddings else v * d
        gaussian = self.gaussian_head.parameter_counts()[0] if self.gaussian_head else 0
        total = embedding + sum(b[0] for b in blocks) + d + gaussian + head
        activated = sum(b[1] for b in blocks) + d + gaussian + (head or embedding)
        mtp = [module.parameter_counts() for module in self.mtp_modules]
        mtp_total = sum(m[0] for m in mtp)
        return {
            "total": total,
            "activated": activated,
            "embedding": embedding,
            "head": head,
            "non_embedding": total - embedding,
            "mtp": mtp_total,
            "mtp_activated": sum(m[1] for m in mtp),
            "total_with_mtp": total + mtp_total,
            "shared_saving": unshared - sum(b[0] for b in blocks),
        }

    def quantizable_layers(self, include=("attention", "ffn")) -> list:
        """The `Dense` projections post-training quantization converts, by their owners'
        declarations: `"attention"` and `"ffn"` (dense feed-forwards and MoE shared
        experts) of the decoder blocks, `"head"` (an untied output head). MTP modules
        (training only) are never included; each shared sublayer appears once."""
        seen, out = set(), []
        for block in self.blocks:
            for key, declared, layer in block.projection_layers():
                if key.split("/")[0] not in include or not declared.quantizable:
                    continue
                # a low-rank projection's two factors are plain Dense layers
                parts = [layer.down, layer.up] if isinstance(layer, LowRankDense) else [layer]
                for part in parts:
                    if type(part) is keras.layers.Dense and id(part) not in seen:
                        seen.add(id(part))
                        out.append(part)
        if "head" in include and self.lm_head is not None:
            out.append(self.lm_head)
        return out

    def prunable_units(self) -> list[list]:
        """Per decoder block, its `PrunableUnits` (attention heads, FFN channels, experts)."""
        return [block.prunable_units() for block in self.blocks]

    def cache_values_per_token(self) -> int:
        """Values all layers' KV caches grow by per decoded token (works unbuilt)."""
        return sum(block.cache_values_per_token() for block in self.blocks)
