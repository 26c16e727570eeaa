"""The model registry's grid fast path gives the same values and Jacobians as the general one."""

from __future__ import annotations

import numpy as np
import pytest
from lm_windows import draw_seed

from stemgpu.atoms.models import MODELS, get_model, window_grid


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("k", [5, 11, 19])
def test_grid_path_equals_general_path(name, k):
    seed = draw_seed()
    rng = np.random.default_rng(seed)
    mdl = get_model(name)
    t = rng.normal(size=(40, mdl.n_params))
    t[:, 0] += 5.0  # log amplitude in counts
    t[:, list(mdl.position)] = rng.uniform(-0.5, k - 0.5, size=(40, 2))
    t[:, list(mdl.widths)] = np.log(rng.uniform(0.5, k / 2, size=(40, len(mdl.widths))))
    yy, xx = window_grid(k, np)
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


def test_window_grid_is_the_row_major_pixel_grid():
    yy, xx = window_grid(4, np)
    rows, cols = np.indices((4, 4))
    np.testing.assert_array_equal(yy, rows.ravel().astype(float))
    np.testing.assert_array_equal(xx, cols.ravel().astype(float))
    assert yy.dtype == xx.dtype == np.float64
