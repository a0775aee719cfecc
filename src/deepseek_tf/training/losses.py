"""The losses: next-token cross-entropy, Multi-Token Prediction, MoE balance, distillation.

`objective` is the one training objective every trainer uses (`training.step`): the
next-token loss, plus `mtp_loss_weight` times the mean MTP loss, plus the MoE balance
losses the model reports, plus an optional extra term (distillation). Evaluation and
pruning importance read the same functions.
"""

from __future__ import annotations

from keras import ops


def token_losses(logits, targets):
    """Per-token cross-entropy `(B, T)` in float32."""
    return ops.sparse_categorical_crossentropy(
        targets, ops.cast(logits, "float32"), from_logits=True
    )


def weighted_mean(values, weights):
    """`sum(values * weights) / sum(weights)` (0 weights: 0)."""
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)


def mtp_loss(mtp_logits, targets, weights):
    """Mean over depths `k` of the loss of MTP depth `k`, which predicts `targets[:, k:]`
    from positions `[:, :-k]`; `mtp_logits[k - 1]` is `(B, T - k, V)`."""
    losses = [
        weighted_mean(token_losses(logits, targets[:, k:]), weights[:, k:])
        for k, logits in enumerate(mtp_logits, start=1)
    ]
    return ops.mean(ops.stack(losses))


def objective(
    logits,
    stats: dict,
    targets,
    weights,
    *,
    mtp_loss_weight: float,
    hard_loss_weight: float = 1.0,
    extra=None,
):
    """The training objective and its parts.

    Args:
        logits: `(B, T, V)` next-token logits.
        stats: the model's training statistics (`CausalLM.forward_with_stats`).
        targets, weights: `(B, T)` next-token targets and loss weights.
        mtp_loss_weight: lambda of the MTP loss.
        hard_loss_weight: weight of the data losses (next-token + MTP); distillation
            gives the rest of the weight to its own term.
        extra: an additional scalar term (e.g. weighted distillation), or None.

    Returns:
        `(objective, parts)`: `parts` holds `loss` (next-token), `aux_loss`,
        `activation_sparsity`, and `mtp_loss` / `expert_load` / `extra_loss` / `head_kl`
        when present. With a gaussian head, `loss` is the token loss averaged over its
        samples and `head_kl` the weighted KL to its prior: together the negative ELBO.
    """
    if "sample_logits" in stats:  # a gaussian head: the token loss averaged over its samples
        sampled = stats["sample_logits"]  # (S, B, T, V)
        samples = ops.shape(sampled)[0]
        flat = ops.reshape(sampled, (-1, *ops.shape(sampled)[2:]))  # (S*B, T, V)
        repeat = [samples, 1]  # targets and weights for each sample: (S*B, T)
        loss = weighted_mean(
            token_losses(flat, ops.tile(targets, repeat)), ops.tile(weights, repeat)
        )
    else:
        loss = weighted_mean(token_losses(logits, targets), weights)
    parts = {
        "loss": loss,
        "aux_loss": stats["aux_loss"],
        "activation_sparsity": stats["activation_sparsity"],
    }
    data_loss = parts["loss"]
    if stats["mtp_logits"]:
        parts["mtp_loss"] = mtp_loss(stats["mtp_logits"], targets, weights)
        data_loss = data_loss + mtp_loss_weight * parts["mtp_loss"]
    total = hard_loss_weight * data_loss + parts["aux_loss"]
    if "head_kl" in stats:  # the ELBO's KL term (already weighted), mean over tokens
        parts["head_kl"] = weighted_mean(stats["head_kl"], weights)
        total = total + parts["head_kl"]
    if extra is not None:
        parts["extra_loss"] = extra
        total = total + extra
    if "expert_load" in stats:
        parts["expert_load"] = stats["expert_load"]  # (L_moe, E)
    return total, parts


def distillation_term(teacher_logits, student_logits, weights, temperature: float):
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, weighted mean over tokens."""
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    teacher_logp = ops.log_softmax(t, axis=-1)
    kl = ops.sum(ops.exp(teacher_logp) * (teacher_logp - ops.log_softmax(s, axis=-1)), axis=-1)
    return weighted_mean(kl, weights) * temperature**2
