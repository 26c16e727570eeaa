"""The Cramér-Rao bound against closed-form limits and against fits on simulated data."""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.atoms.crlb import crlb
from stemgpu.atoms.fit import fit_atoms
from stemgpu.synthetic import simulate_image


def test_crlb_matches_photon_counting_limit_without_background():
    # Well-sampled Gaussian, negligible background: var(row) = sigma^2 / N_photons.
    a, s = 500.0, 4.0
    b = crlb(np.array([[a, 30.0, 30.0, s, 1e-6]]), window=41, neighbours="none")
    n_photons = 2 * np.pi * s * s * a
    assert b[0, 1] == pytest.approx(s / np.sqrt(n_photons), rel=0.02)
    assert b[0, 1] == pytest.approx(b[0, 2], rel=1e-9)


def test_crlb_grows_with_background_and_falls_with_dose():
    base = crlb(np.array([[200.0, 20.0, 20.0, 3.4, 10.0]]), neighbours="none")[0, 1]
    more_bg = crlb(np.array([[200.0, 20.0, 20.0, 3.4, 100.0]]), neighbours="none")[0, 1]
    four_x = crlb(np.array([[800.0, 20.0, 20.0, 3.4, 40.0]]), neighbours="none")[0, 1]
    assert more_bg > 1.3 * base
    assert four_x == pytest.approx(base / 2, rel=1e-6)  # everything scales with dose


def test_crlb_scales_with_counts_per_unit():
    p = np.array([[2.0, 20.0, 20.0, 3.4, 0.1]])
    in_units = crlb(p, counts_per_unit=100.0, neighbours="none")
    in_counts = crlb(p * [100, 1, 1, 1, 100], neighbours="none")
    np.testing.assert_allclose(in_units[:, 1:4], in_counts[:, 1:4], rtol=1e-9)


def test_fit_scatter_reaches_crlb_on_isolated_columns():
    """Monte-Carlo check: 120 isolated columns, MLE position scatter vs the bound."""
    image, truth = simulate_image((256, 256), lattice="square", lattice_parameter_pm=300.0,
                                  probe_sigma_pm=40.0, dose=300.0, seed=21)
    keep = truth.visible(0, margin=10)
    pos = truth.image_positions(0)[keep]
    fit = fit_atoms(image, pos, sigma=truth.probe_sigma_px, counts_per_unit=1)
    n = len(pos)
    params = np.stack([np.full(n, 300.0), pos[:, 0], pos[:, 1],
                       np.full(n, truth.probe_sigma_px), np.full(n, 15.0)], 1)
    bound = crlb(params, image_shape=image.shape, window=fit.parameters["window"])
    assert fit.converged.all() and n > 100
    ratio = np.sqrt(np.mean((fit.positions - pos) ** 2)) / np.sqrt(np.mean(bound[:, 1:3] ** 2))
    assert 0.85 < ratio < 1.1
    # The fit's own error bars agree with the bound at the truth.
    np.testing.assert_allclose(np.median(fit.position_errors), np.median(bound[:, 1:3]),
                               rtol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    ({"params": np.zeros((2, 4))}, r"params must have shape \(N, 5\) for model 'gaussian'"),
    ({"counts_per_unit": 0.0}, r"counts_per_unit must be a positive number; got 0.0"),
    ({"neighbours": "all"}, r"neighbours must be one of 'include', 'none'; got 'all'"),
    ({"neighbours": "include"}, r"neighbours='include' needs image_shape"),
])
def test_crlb_errors(kwargs, match):
    args = {"params": np.array([[200.0, 20.0, 20.0, 3.4, 10.0]]), "neighbours": "none"}
    args.update(kwargs)
    p = args.pop("params")
    with pytest.raises(ValueError, match=match):
        crlb(p, **args)
