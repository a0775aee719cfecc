"""Server-side updates of the global model from the clients' averaged update.

`Delta` is the (weighted, possibly clipped, noised and securely summed) mean of the
sampled clients' `local weights - global weights`:

- `fedavg` / `fedprox:MU` (McMahan et al. 2017; Li et al. 2020: the clients add
  `MU / 2 * ||w - w_global||^2` to their loss): `w += server_lr * Delta` (1: plain
  averaging);
- `fedadam` / `fedyogi` (Reddi et al. 2021, "Adaptive Federated Optimization"): `Delta` is
  a pseudo-gradient for server-side Adam or Yogi moments,
  `m = b1 m + (1 - b1) Delta`, `v = b2 v + (1 - b2) Delta^2` (Adam) or
  `v = v - (1 - b2) Delta^2 sign(v - Delta^2)` (Yogi), `w += server_lr * m / (sqrt(v) + tau)`
  -- written out here (Keras' Adam has bias correction the paper does not; Keras has no
  Yogi).

The server learning rate 0 (`federated.server_learning_rate`'s default) is the algorithm's
own: 1 for `fedavg`/`fedprox` (plain averaging), 0.01 for `fedadam`/`fedyogi`. The
adaptive step moves every coordinate by about `server_lr` a round whatever the size of
`Delta`, so plain averaging's 1 diverges (the `tiny` model's client loss went from 4.06 to
15.2 in 4 rounds). Reddi et al. tune the adaptive server rate per task; 0.01 with `tau`
1e-3 trains this repository's models (`benchmarks/federated.py`'s FedAdam row,
`tests/federated/test_defaults.py`).
"""

from __future__ import annotations

import numpy as np

from deepseek_tf.errors import ConfigError

ALGORITHMS = ("fedavg", "fedprox:MU", "fedadam", "fedyogi")
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}


def server_learning_rate(algorithm: str, learning_rate: float) -> float:
    """`learning_rate`, or (0) the algorithm's default (`DEFAULT_SERVER_LR`).

    >>> server_learning_rate("fedadam", 0.0), server_learning_rate("fedavg", 0.0)
    (0.01, 1.0)
    >>> server_learning_rate("fedadam", 0.05)
    0.05
    """
    return learning_rate or DEFAULT_SERVER_LR[algorithm]


def parse_algorithm(spec: str) -> tuple[str, float]:
    """`"fedprox:0.01"` -> `("fedprox", 0.01)`; other algorithms have mu 0."""
    kind, _, value = spec.partition(":")
    if kind == "fedprox":
        try:
            mu = float(value)
        except ValueError:
            raise ConfigError(
                f"--algorithm {spec!r}: fedprox needs MU, e.g. fedprox:0.01"
            ) from None
        if not np.isfinite(mu) or mu < 0:
            raise ConfigError(f"--algorithm {spec!r}: MU must be a number >= 0")
        return kind, mu
    if kind not in ("fedavg", "fedadam", "fedyogi") or value:
        raise ConfigError(f"--algorithm {spec!r}: choose {' | '.join(ALGORITHMS)}")
    return kind, 0.0


class ServerOptimizer:
    """Applies `Delta` to the global weights; its moments are part of the server state.

    Args:
        algorithm: `fedavg`, `fedprox`, `fedadam` or `fedyogi`.
        learning_rate: the server's step size (0: the algorithm's default).
        beta1, beta2, tau: the moment settings.
        shapes: shapes of the aggregated weights (the moments' shapes).
    """

    def __init__(self, algorithm: str, learning_rate: float, beta1: float, beta2: float,
                 tau: float, shapes):  # fmt: skip
        self.algorithm = algorithm
        self.learning_rate = server_learning_rate(algorithm, learning_rate)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        adaptive = algorithm in ("fedadam", "fedyogi")
        self.m = [np.zeros(s, np.float32) for s in shapes] if adaptive else []
        self.v = [np.full(s, tau**2, np.float32) for s in shapes] if adaptive else []

    def apply(self, weights: list[np.ndarray], delta: list[np.ndarray]) -> list[np.ndarray]:
        if self.algorithm in ("fedavg", "fedprox"):
            return [w + np.float32(self.learning_rate) * d for w, d in zip(weights, delta)]
        out = []
        for i, (w, d) in enumerate(zip(weights, delta)):
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * d
            square = d * d
            if self.algorithm == "fedadam":
                self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * square
            else:  # yogi: v moves towards d^2 by an additive, sign-controlled step
                self.v[i] = self.v[i] - (1 - self.beta2) * square * np.sign(self.v[i] - square)
            step = self.learning_rate * self.m[i] / (np.sqrt(self.v[i]) + self.tau)
            out.append((w + step).astype(np.float32))
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The moments, as `m_<i>` / `v_<i>` arrays (saved with each round's checkpoint)."""
        return {**{f"m_{i}": m for i, m in enumerate(self.m)},
                **{f"v_{i}": v for i, v in enumerate(self.v)}}  # fmt: skip

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m = [state[f"m_{i}"] for i in range(len(self.m))]
        self.v = [state[f"v_{i}"] for i in range(len(self.v))]
