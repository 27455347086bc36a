"""The (ε, δ) that ``fleet serve --dp-clip --dp-noise`` reports (runtime/privacy.py): the Gaussian
mechanism composed over the rounds, solved exactly. Reference values: Google's dp-accounting 0.6.0 (its
PLD accountant, GaussianDpEvent composed T times, δ = 1e-5), computed once on 2026-12-07 in a separate
venv; dp-accounting is not a dependency of edgexfer."""
from __future__ import annotations

import math

import pytest

from edgexfer.runtime.privacy import epsilon, gaussian_delta, privacy_record

#: (noise multiplier, rounds): ε at δ = 1e-5 by dp-accounting's PLD accountant (its RDP accountant: 4.73,
#: 12.30, 8.08, 1.45, looser)
REFERENCE = {(1.0, 1): 4.37717810002493, (1.0, 5): 11.480022811714345, (2.0, 10): 7.511275904062699,
             (5.0, 3): 1.3262312470008548}


@pytest.mark.parametrize("sigma, rounds", sorted(REFERENCE))
def test_epsilon_matches_an_independent_accountant(sigma, rounds):
    assert epsilon(sigma, rounds) == pytest.approx(REFERENCE[sigma, rounds], rel=1e-6)


def test_epsilon_is_where_delta_meets_its_target_and_grows_with_rounds_and_falls_with_noise():
    eps = epsilon(1.5, 4)
    s = 1.5 / math.sqrt(4)
    assert gaussian_delta(eps, s) <= 1e-5 < gaussian_delta(eps * 0.999, s)
    assert epsilon(1.5, 4) < epsilon(1.5, 5) and epsilon(2.0, 4) < epsilon(1.5, 4)
    assert epsilon(1.0, 4) == pytest.approx(epsilon(0.5, 1), rel=1e-9)  # T rounds of σ = one round of σ/√T


def test_no_noise_is_no_guarantee_and_the_record_says_so():
    assert epsilon(0.0, 3) == math.inf and epsilon(1.0, 0) == 0.0
    record = privacy_record(0.0, 1.0, 3)
    assert record["epsilon"] == "inf" and record["delta"] == 1e-5 and record["rounds"] == 3
