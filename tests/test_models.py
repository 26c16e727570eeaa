"""The model registry's grid fast path gives the same values and Jacobians as the general one."""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.atoms.models import MODELS, get_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("k", [5, 11, 19])
def test_grid_path_equals_general_path(name, k):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    mdl = get_model(name)
    t = rng.normal(size=(40, mdl.n_params))
    t[:, 0] += 5.0  # log amplitude in counts
    t[:, list(mdl.position)] = rng.uniform(-0.5, k - 0.5, size=(40, 2))
    t[:, list(mdl.widths)] = np.log(rng.uniform(0.5, k / 2, size=(40, len(mdl.widths))))
    d = np.arange(k, dtype=float)
    yy, xx = (g.ravel() for g in np.meshgrid(d, d, indexing="ij"))
    v_general = mdl.value(t, yy, xx, np)
    mu_general, jac_general = mdl.value_and_jacobian(t, yy, xx, np)
    v_grid = mdl.value_on_grid(t, k, np)
    mu_grid, jac_grid = mdl.value_and_jacobian_on_grid(t, k, np)
    assert jac_grid.shape == (40, k * k, mdl.n_params)
    scale = np.abs(jac_general).max()
    np.testing.assert_allclose(v_grid, v_general, rtol=1e-13, atol=1e-12 * scale,
                               err_msg=f"seed {seed}")
    np.testing.assert_allclose(mu_grid, mu_general, rtol=1e-13, atol=1e-12 * scale,
                               err_msg=f"seed {seed}")
    np.testing.assert_allclose(jac_grid, jac_general, rtol=1e-12, atol=1e-12 * scale,
                               err_msg=f"seed {seed}")
