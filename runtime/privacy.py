"""What central differential privacy of fleet learning guarantees: (ε, δ) of the rounds run so far.

``fleet serve --dp-clip S --dp-noise σ`` (:meth:`edgexfer.runtime.federated.HeadFedAvg._linear_private`)
clips each device's step to L2 norm S and adds Gaussian noise of std σ·S to their sum (σ·S/m on the mean
of m devices): a Gaussian mechanism with noise multiplier σ whose unit of privacy is one device's whole
update (adding or removing a device). T such rounds compose into one Gaussian mechanism with noise
multiplier σ/√T (Gaussian noise adds up exactly), and a Gaussian mechanism's (ε, δ) curve is known in
closed form (Balle and Wang, "Improving the Gaussian mechanism for differential privacy", ICML 2018):

    δ(ε) = Φ(1/(2s) - ε·s) - e^ε · Φ(-1/(2s) - ε·s),    s = σ/√T

:func:`epsilon` solves it for ε by bisection. Nothing is gained from the devices asked per round being a
sample of the fleet (``--fraction``): amplification by sampling is not claimed, so the figure is an upper
bound when fewer than all devices are asked. The counts a device sends travel in the clear and are not
covered (docs/fleet.md, "What travels").
"""
from __future__ import annotations

import math

#: δ of the reported (ε, δ): below 1 / (devices) for any fleet up to 100,000 devices
DELTA = 1e-5


def _phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(eps: float, s: float) -> float:
    """δ of a Gaussian mechanism with noise multiplier ``s`` (sensitivity 1) at ``eps`` (Balle and Wang)."""
    a, b = 1.0 / (2.0 * s), eps * s
    p = _phi(-a - b)  # e^ε·Φ(-a - b) in logs: e^ε alone overflows for large ε
    tail = math.exp(eps + math.log(p)) if p > 0 else 0.0
    return max(0.0, _phi(a - b) - tail)


def epsilon(noise_multiplier: float, rounds: int, delta: float = DELTA) -> float:
    """The smallest ε with ``rounds`` Gaussian rounds of ``noise_multiplier`` (ε, ``delta``)-DP (``inf``:
    no noise, or no finite ε up to 10,000; 0.0 for no rounds)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    s = noise_multiplier / math.sqrt(rounds)
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, s) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    for _ in range(100):  # bisection to well below the precision anyone reads
        mid = (lo + hi) / 2
        if gaussian_delta(mid, s) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def privacy_record(noise_multiplier: float, clip: float, rounds: int, delta: float = DELTA) -> dict[str, object]:
    """What a round record says of privacy after ``rounds`` private rounds."""
    eps = epsilon(noise_multiplier, rounds, delta)
    return {"epsilon": eps if math.isfinite(eps) else "inf", "delta": delta, "noise_multiplier": noise_multiplier,
            "clip": clip, "rounds": rounds, "unit": "one device's update (add or remove a device)",
            "accounting": "Gaussian mechanism composed exactly over the rounds (Balle and Wang 2018); "
                          "no amplification by sampling claimed"}
