"""Device tests of the fused LM kernel (``pytest -m gpu``): kernel vs NumPy, CuPy in/out.

Skipped without a usable CUDA device (see ``tests/conftest.py``). They need only CuPy, NumPy,
SciPy and pytest; no sidpy / pyNSID (run from a source tree with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import numpy as np
import pytest
from lm_windows import K, draw_seed, window_problem

from stemgpu.atoms import models
from stemgpu.atoms.lm import lm_fit

pytestmark = pytest.mark.gpu


def _problem(seed, model):
    return window_problem(seed, model, size=128, frames=3, species=("Sr", "TiO"),
                          width_spread=0.0, random_angle=False)


@pytest.mark.parametrize("model", ["gaussian", "elliptical"])
@pytest.mark.parametrize("estimator", ["mle", "lsq"])
@pytest.mark.parametrize("compute_dtype,tol", [("float64", 1e-4), ("float32", 1e-3)])
def test_kernel_matches_numpy_on_device(model, estimator, compute_dtype, tol):
    import cupy as cp

    from stemgpu.atoms.cuda import lm_fit_kernel

    seed = draw_seed()
    stack, f_idx, origins, wins, init = _problem(seed, model)
    ref = lm_fit(wins, origins.astype(np.float64), init, model=model, estimator=estimator,
                 xp=np)
    out = lm_fit_kernel(cp.asarray(stack), cp.asarray(f_idx), cp.asarray(origins),
                        cp.asarray(init), window=K, model=model, estimator=estimator,
                        compute_dtype=compute_dtype)
    assert all(isinstance(a, cp.ndarray) for a in out)
    st = cp.asnumpy(out.status)
    par = cp.asnumpy(out.params)
    np.testing.assert_array_equal(st, ref.status, err_msg=f"seed={seed}")
    dpos = np.abs(par[:, 1:3] - ref.params[:, 1:3]).max()
    assert dpos <= tol, f"max position difference {dpos:.3g} px, seed={seed}"
    if compute_dtype == "float64":
        ok = ref.status == models.CONVERGED
        np.testing.assert_allclose(cp.asnumpy(out.param_errors)[ok], ref.param_errors[ok],
                                   rtol=1e-6, err_msg=f"seed={seed}")


def test_auto_compute_dtype_follows_the_device():
    """``compute_dtype="auto"`` (the default) is the device's choice, launch for launch."""
    import cupy as cp

    from stemgpu.atoms.cuda import auto_compute_dtype, device_compute_dtype, lm_fit_kernel

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    chosen = device_compute_dtype()
    assert chosen == auto_compute_dtype(props)
    stack, f_idx, origins, wins, init = _problem(5, "gaussian")
    args = (cp.asarray(stack), cp.asarray(f_idx), cp.asarray(origins), cp.asarray(init))
    auto = lm_fit_kernel(*args, window=K)
    explicit = lm_fit_kernel(*args, window=K, compute_dtype=chosen)
    for a, b in zip(auto, explicit, strict=True):
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


def test_kernel_matches_host_build_bitwise_statuses():
    """Device and host builds of the same source agree (statuses exactly, positions 1e-6 px;
    nvcc contracts to FMA on the device, not on the host)."""
    import cupy as cp
    from host_build import find_nvcc, host_lm_fit

    from stemgpu.atoms.cuda import lm_fit_kernel

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed (host build unavailable)")
    stack, f_idx, origins, wins, init = _problem(3, "gaussian")
    host = host_lm_fit(stack, f_idx, origins, init, window=K)
    dev = lm_fit_kernel(cp.asarray(stack), cp.asarray(f_idx), cp.asarray(origins),
                        cp.asarray(init), window=K)
    np.testing.assert_array_equal(cp.asnumpy(dev.status), host.status)
    np.testing.assert_allclose(cp.asnumpy(dev.params), host.params, rtol=0, atol=1e-6)


def test_cupy_in_cupy_out_no_host_copies():
    """No device->host transfer inside the kernel path (CuPy's transfer hook must stay silent)."""
    import cupy as cp

    from stemgpu.atoms.cuda import get_module, lm_fit_kernel

    stack, f_idx, origins, wins, init = _problem(4, "gaussian")
    args = (cp.asarray(stack), cp.asarray(f_idx), cp.asarray(origins), cp.asarray(init))
    get_module(image_dtype=str(stack.dtype))  # compile outside the check
    lm_fit_kernel(*args, window=K)
    cp.cuda.Device().synchronize()
    from cupyx import allow_synchronize

    with allow_synchronize(False):  # a hidden .get() / int(array) would raise here
        out = lm_fit_kernel(*args, window=K)
    assert isinstance(out.params, cp.ndarray) and out.params.device == args[0].device


def test_window_outside_image_flagged_on_device():
    import cupy as cp

    from stemgpu.atoms.cuda import lm_fit_kernel

    img = cp.ones((1, 20, 20), dtype=cp.float32)
    out = lm_fit_kernel(img, cp.zeros(2, dtype=cp.int32),
                        cp.asarray([[15, 2], [-1, 3]], dtype=cp.int32),
                        cp.asarray([[5.0, 20, 8, 2, 1], [5.0, 5, 8, 2, 1]]), window=K)
    assert cp.asnumpy(out.status).tolist() == [models.OUT_OF_BOUNDS] * 2


def test_bad_arguments_raise():
    import cupy as cp

    from stemgpu.atoms.cuda import lm_fit_kernel

    img = cp.ones((20, 20), dtype=cp.float32)
    org = cp.zeros((1, 2), dtype=cp.int32)
    with pytest.raises(ValueError, match=r"estimator must be one of 'mle', 'lsq'; got 'l2'"):
        lm_fit_kernel(img, 0, org, cp.ones((1, 5)), window=K, estimator="l2")
    with pytest.raises(ValueError, match=r"init must have shape \(M, 5\)"):
        lm_fit_kernel(img, 0, org, cp.ones((1, 4)), window=K)
    with pytest.raises(ValueError, match=r"compute_dtype must be one of 'auto', 'float32', "
                                         r"'float64'; got 'half'"):
        lm_fit_kernel(img, 0, org, cp.ones((1, 5)), window=K, compute_dtype="half")


@pytest.mark.parametrize("engine", ["array", "kernel"])
def test_fit_atoms_on_cupy_matches_numpy(engine):
    """The whole fit_atoms path (neighbour offsets, edge peaks, held-width refits, gain
    estimate) on CuPy gives NumPy's answers and returns CuPy arrays."""
    import cupy as cp

    from stemgpu.atoms.fit import fit_atoms
    from stemgpu.synthetic import simulate_image

    image, truth = simulate_image((256, 256), dose=200.0, seed=3)
    pos = truth.image_positions(0)[truth.visible(0, margin=0)]
    ref = fit_atoms(image, pos, sigma=truth.probe_sigma_px, backend="numpy")
    dev = fit_atoms(cp.asarray(image), cp.asarray(pos), sigma=truth.probe_sigma_px,
                    engine=engine)
    assert isinstance(dev.positions, cp.ndarray)
    assert dev.parameters["engine"] == engine and dev.parameters["backend"] == "cupy"
    got = dev.to_numpy()
    same = got.status == ref.status
    assert same.mean() >= 0.99, ref.status_counts()
    ok = same & ref.converged
    tol = 1e-6 if engine == "array" else 1e-4
    np.testing.assert_allclose(got.positions[ok], ref.positions[ok], rtol=0, atol=tol)
    np.testing.assert_allclose(got.position_errors[ok], ref.position_errors[ok], rtol=1e-3)
    assert abs(got.counts_per_unit / ref.counts_per_unit - 1) < 1e-3
