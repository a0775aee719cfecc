"""Secure aggregation with pairwise additive masks (Bonawitz et al., 2017, without the
double masking): the server learns the sum of the clients' updates, not any one of them.

1. Every client of a round makes a Diffie-Hellman key pair (RFC 3526's 2048-bit MODP
   group 14) and the server relays the public keys.
2. Clients `i < j` share the secret `s_ij = g^(a_i a_j) mod p`; from it and the round
   number a cryptographic generator (SHAKE-256) expands a mask `m_ij` of 32-bit words.
3. Client `i` uploads `q(u_i) + sum_{j > i} m_ij - sum_{j < i} m_ji (mod 2^32)`, where
   `q` is fixed-point quantisation (`2^-frac_bits` steps, two's complement): a uniformly
   random-looking vector.
4. Summed modulo 2^32 the masks cancel and the server dequantises the exact sum of the
   quantised updates. A client that drops out after the keys were exchanged leaves its
   masks uncancelled: the survivors reveal their pairwise secrets with it (never their
   own inputs) and the server removes those masks, provided at least `threshold` clients
   survive; otherwise the round is aborted.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import numpy as np

from deepseek_tf.errors import TrainingError

# RFC 3526, 2048-bit MODP group (group 14), generator 2.
PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
GENERATOR = 2
MODULUS = 1 << 32


def quantize(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Fixed-point `round(v * 2^frac_bits)` as uint32 (two's complement, modulo 2^32)."""
    scaled = np.round(np.asarray(values, np.float64) * (1 << frac_bits)).astype(np.int64)
    return (scaled % MODULUS).astype(np.uint32)


def dequantize(words: np.ndarray, frac_bits: int) -> np.ndarray:
    """The signed fixed-point values of uint32 `words` (inverse of `quantize`)."""
    signed = words.astype(np.int64)
    signed = np.where(signed >= MODULUS // 2, signed - MODULUS, signed)
    return (signed / float(1 << frac_bits)).astype(np.float32)


def mask(secret: int, round_index: int, size: int) -> np.ndarray:
    """`size` uint32 words expanded from a shared secret and the round (SHAKE-256)."""
    seed = secret.to_bytes(256, "big") + round_index.to_bytes(8, "big")
    return np.frombuffer(hashlib.shake_256(seed).digest(4 * size), dtype="<u4").copy()


@dataclass
class MaskingClient:
    """A client's side of the protocol for one round."""

    client_id: int
    round_index: int
    private_key: int = field(default_factory=lambda: secrets.randbelow(PRIME - 3) + 2)

    @property
    def public_key(self) -> int:
        return pow(GENERATOR, self.private_key, PRIME)

    def shared_secret(self, other_public: int) -> int:
        return pow(other_public, self.private_key, PRIME)

    def masked(self, values: np.ndarray, public_keys: dict[int, int], frac_bits: int):
        """The quantised `values` plus this client's pairwise masks (mod 2^32)."""
        out = quantize(values, frac_bits)
        for other, public in public_keys.items():
            if other == self.client_id:
                continue
            words = mask(self.shared_secret(public), self.round_index, out.size)
            out = out + words if self.client_id < other else out - words  # wraps mod 2^32
        return out

    def reveal(self, dropped: list[int], public_keys: dict[int, int]) -> dict[int, int]:
        """The pairwise secrets with clients that dropped out (so that the server can
        remove their uncancelled masks); never this client's own input."""
        return {d: self.shared_secret(public_keys[d]) for d in dropped}


class MaskedSum:
    """The server's side: collects masked vectors, removes the masks of dropped clients,
    returns the dequantised sum.

    Args:
        public_keys: `{client id: public key}` of everyone who joined the round.
        size: words per vector.
        round_index: the round (mask derivation).
        frac_bits: the quantisation's fractional bits.
        threshold: fewest surviving clients for the round to go on.
    """

    def __init__(self, public_keys: dict, size: int, round_index: int, frac_bits: int,
                 threshold: int):  # fmt: skip
        self.public_keys, self.size, self.round = dict(public_keys), size, round_index
        self.frac_bits, self.threshold = frac_bits, threshold
        self.total = np.zeros(size, np.uint32)
        self.received: set[int] = set()

    def add(self, client_id: int, words: np.ndarray) -> None:
        if client_id not in self.public_keys or client_id in self.received:
            raise TrainingError(f"secure aggregation: unexpected vector from client {client_id}")
        self.total = self.total + words.astype(np.uint32)  # wraps mod 2^32
        self.received.add(client_id)

    @property
    def dropped(self) -> list[int]:
        return sorted(set(self.public_keys) - self.received)

    def result(self, revealed: dict[int, dict[int, int]]) -> np.ndarray:
        """The sum of the survivors' quantised values, dequantised. `revealed[i][d]` is
        survivor `i`'s pairwise secret with dropped client `d`."""
        if len(self.received) < self.threshold:
            raise TrainingError(
                f"secure aggregation: {len(self.received)} clients survived the round, fewer "
                f"than the threshold {self.threshold}; the round is aborted"
            )
        total = self.total.copy()
        for survivor in self.received:
            for dropped in self.dropped:
                words = mask(revealed[survivor][dropped], self.round, self.size)
                # the survivor added +m (if it has the lower id) or -m: take it back
                total = total - words if survivor < dropped else total + words
        return dequantize(total, self.frac_bits)
