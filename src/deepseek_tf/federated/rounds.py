"""One round's server-side arithmetic: which clients to ask, and how their updates combine.

`aggregate` turns the clients' updates into the global update `Delta`:

- non-finite updates are rejected (logged, never averaged);
- without DP: the weighted mean `sum_k n_k u_k / sum_k n_k` (`n_k`: the client's data
  size, FedAvg's weights);
- with DP (`privacy`): each update clipped to `C`, summed, noised with `N(0, (zC)^2)`,
  divided by the expected number of clients;
- with secure aggregation (`secure_aggregation`): the sum is computed from pairwise-masked
  vectors, so the server handles no single client's update in the clear (the clients
  scale and clip their own updates before masking).
"""

from __future__ import annotations

import math

import numpy as np

from deepseek_tf.errors import TrainingError
from deepseek_tf.federated.privacy import DPConfig, add_noise, clip_update
from deepseek_tf.federated.secure_aggregation import MaskedSum, MaskingClient


def sample_clients(clients: int, per_round: int, round_index: int, seed: int, poisson: bool):
    """The clients of a round: `per_round` of `clients` uniformly without replacement, or
    (DP) each client independently with probability `per_round / clients`. Depends only
    on the seed and the round (a resumed run asks the same clients)."""
    rng = np.random.default_rng([seed, round_index])
    if poisson:
        return sorted(np.flatnonzero(rng.random(clients) < per_round / clients).tolist())
    return sorted(rng.choice(clients, size=per_round, replace=False).tolist())


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)


def unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for a in like:
        out.append(vector[start : start + a.size].reshape(a.shape).astype(np.float32))
        start += a.size
    return out


def _finite(results, log) -> list[dict]:
    kept = []
    for r in results:
        if all(np.all(np.isfinite(u)) for u in r["update"]) and math.isfinite(r["loss"]):
            kept.append(r)
        else:
            log(f"[federated] rejected client {r['client']}'s update: it is not finite")
    return kept


def aggregate(
    results: list[dict],
    shapes: list[np.ndarray],
    *,
    dp: DPConfig,
    expected_clients: int,
    secure: bool,
    frac_bits: int,
    threshold: int,
    round_index: int,
    rng,
    log=print,
    drop=(),
) -> tuple[list[np.ndarray] | None, dict]:
    """`(Delta or None, info)`: None when no update is usable.

    Args:
        results: `{"client", "update", "weight", "loss"}` per client that answered.
        shapes: arrays shaped like the weights (the global weights).
        dp, expected_clients: DP settings and the fixed denominator `K`.
        secure, frac_bits, threshold: secure aggregation settings.
        round_index: the round (secure aggregation masks).
        rng: the DP noise generator.
        drop: clients that exchange keys but never send their vector (a client lost
            mid-round; secure aggregation recovers the sum without it).
    """
    results = _finite(results, log)
    info = {"accepted": [r["client"] for r in results]}
    if not results:
        return None, info
    if dp.enabled:
        scaled, norms = [], []
        for r in results:
            clipped, norm = clip_update(r["update"], dp.clip)
            scaled.append(clipped)
            norms.append(norm)
        info["clipped_fraction"] = float(np.mean([n > dp.clip for n in norms]))
        denominator = float(expected_clients)
    else:
        total_weight = float(sum(r["weight"] for r in results))
        scaled = [[u * np.float32(r["weight"] / total_weight) for u in r["update"]]
                  for r in results]  # fmt: skip
        denominator = 1.0
    if secure:
        total = secure_sum(results, scaled, frac_bits, threshold, round_index, drop, info)
        total = unflatten(total, shapes)
        if not dp.enabled:  # the weighted mean over the clients that did send
            kept = [r["weight"] for r in results if r["client"] not in info["secure_dropped"]]
            total = [t * np.float32(total_weight / sum(kept)) for t in total]
    else:
        total = [sum(parts) for parts in zip(*scaled)]
    if dp.enabled:
        total = add_noise(total, dp, rng)
    return [t / np.float32(denominator) for t in total], info


def secure_sum(results, scaled, frac_bits, threshold, round_index, drop, info) -> np.ndarray:
    """The sum of `scaled` updates through pairwise masks (see `secure_aggregation`): what
    the server receives from each client is a masked uint32 vector."""
    ids = [r["client"] for r in results]
    parties = {cid: MaskingClient(cid, round_index) for cid in ids}
    public = {cid: p.public_key for cid, p in parties.items()}  # relayed by the server
    vectors = [flatten(u) for u in scaled]
    server = MaskedSum(public, vectors[0].size, round_index, frac_bits, threshold or
                       -(-len(ids) // 2))  # fmt: skip
    masked = {}
    for cid, vector in zip(ids, vectors):
        if cid in drop:
            continue  # lost after the key exchange
        masked[cid] = parties[cid].masked(vector, public, frac_bits)
        server.add(cid, masked[cid])
    revealed = {cid: parties[cid].reveal(server.dropped, public) for cid in server.received}
    info["secure_dropped"] = server.dropped
    info["masked_bytes"] = int(sum(m.nbytes for m in masked.values()))
    if not server.received:
        raise TrainingError("secure aggregation: no client sent its masked update")
    return server.result(revealed)
