"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018) with `dp-accounting`.

Each round samples every client independently with probability `q = K / N` (Poisson
sampling, the event the accountant analyses), clips each sampled client's update to L2
norm `C` (`--dp-clip`), sums the clipped updates, adds Gaussian noise of standard deviation
`z * C` (`--dp-noise-multiplier`) to the sum and divides by the expected number of clients
`K` (a fixed denominator, so one client changes the average by at most `C / K`). After `R`
rounds the guarantee is `(epsilon, delta)`-DP for any one client's whole data (add or
remove one client), computed with `dp_accounting`'s RDP accountant (its PLD accountant
gives a tighter figure, reported beside it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from deepseek_tf.errors import ConfigError


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP settings (`clip` 0: off)."""

    clip: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0  # 0: min(1e-5, 1 / clients)

    @property
    def enabled(self) -> bool:
        return self.clip > 0


def check_dp(clip: float, noise_multiplier: float, delta: float, clients: int) -> DPConfig:
    """Checked settings; one-line errors naming the option."""
    for name, value in (("--dp-clip", clip), ("--dp-noise-multiplier", noise_multiplier),
                        ("--dp-delta", delta)):  # fmt: skip
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: must be a finite number >= 0, got {value}")
    if noise_multiplier > 0 and clip <= 0:
        raise ConfigError(
            "--dp-noise-multiplier needs --dp-clip: noise is calibrated to the clipping norm "
            "(without clipping one client's update is unbounded)"
        )
    if delta >= 1:
        raise ConfigError(f"--dp-delta: must be below 1, got {delta}")
    return DPConfig(clip, noise_multiplier, delta or min(1e-5, 1.0 / clients))


def clip_update(update: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """`update` scaled to L2 norm at most `clip` (over all its arrays); returns the norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [u * np.float32(factor) for u in update], norm


def add_noise(total: list[np.ndarray], dp: DPConfig, rng) -> list[np.ndarray]:
    """The sum of clipped updates plus `N(0, (z * C)^2)` noise in every coordinate."""
    std = dp.noise_multiplier * dp.clip
    return [t + rng.normal(0.0, std, size=t.shape).astype(np.float32) for t in total]


def epsilon(dp: DPConfig, sampling_rate: float, rounds: int) -> dict:
    """`(epsilon, delta)` after `rounds` Poisson-sampled Gaussian rounds: RDP and PLD."""
    if not dp.enabled or rounds == 0:
        return {"epsilon": 0.0 if rounds == 0 else math.inf, "delta": dp.delta}
    if dp.noise_multiplier == 0:
        return {"epsilon": math.inf, "delta": dp.delta}
    # imported here: dp_accounting (and the SciPy it loads) adds about 1.5 s to every
    # process start, and only a differentially private run needs it
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(dp.noise_multiplier)
    )
    # the RDP accountant warns (through absl) for every order whose series does not
    # converge and drops that order; the result is still a valid bound, so keep it quiet
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        rdp = RdpAccountant()
        rdp.compose(event, rounds)
        pld = PLDAccountant()
        pld.compose(event, rounds)
        return {
            "epsilon": float(rdp.get_epsilon(dp.delta)),
            "epsilon_pld": float(pld.get_epsilon(dp.delta)),
            "delta": dp.delta,
        }
    finally:
        absl_logger.setLevel(level)
