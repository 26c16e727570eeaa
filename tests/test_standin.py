"""The strict CuPy stand-in itself (tests/cupy_standin): what it refuses, what it counts, and
its kernel launches on the host build. Runs only where the stand-in is active (no GPU)."""

from __future__ import annotations

import cupy_standin
import numpy as np
import pytest
from cupy_standin import _api

pytestmark = pytest.mark.skipif(not cupy_standin.active(),
                                reason="the CuPy stand-in is off (a real GPU is in use)")


@pytest.fixture
def cp():
    import cupy

    return cupy


def test_implicit_device_to_host_conversion_raises_cupys_error(cp):
    x = cp.arange(3.0)
    with pytest.raises(TypeError, match=r"Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match=r"Please use `\.get\(\)`"):
        x.__array__()
    with pytest.raises(TypeError, match=r"Implicit conversion"):
        np.array([x, x])  # a list of device arrays: NumPy asks each for __array__


def test_scalar_conversions_allowed_on_size_one_and_counted(cp):
    x = cp.arange(4.0)
    with cupy_standin.count_transfers() as c:
        assert float(x[1]) == 1.0 and int(x.sum()) == 6 and bool(x[2] > 1)
        assert c.scalar == 3 and c.d2h == 0
    with pytest.raises(TypeError, match=r"only length-1 arrays"):
        float(x)
    with pytest.raises(TypeError, match=r"ambiguous"):
        bool(x)


def test_one_transfer_in_one_out(cp):
    host = np.linspace(0, 1, 10)
    with cupy_standin.count_transfers() as c:
        dev = cp.asarray(host)
        out = cp.asnumpy(cp.sqrt(dev) * 2 + dev.sum())
        assert (c.h2d, c.d2h) == (1, 1)
    np.testing.assert_allclose(out, np.sqrt(host) * 2 + host.sum())
    with cupy_standin.count_transfers() as c:
        dev.get()
        dev.tolist()
        cp.asarray(dev)  # already on the device: no transfer
        assert (c.h2d, c.d2h) == (0, 2)


def test_reductions_return_device_scalars(cp):
    x = cp.ones((2, 3))
    for r in (x.sum(), cp.max(x), x[0, 0], cp.median(x), np.mean(x)):
        assert isinstance(r, cp.ndarray) and r.ndim == 0


@pytest.mark.parametrize("op", [
    lambda cp, d, h: d + h,
    lambda cp, d, h: h * d,
    lambda cp, d, h: cp.add(d, h),
    lambda cp, d, h: cp.where(d > 0, d, h),
    lambda cp, d, h: cp.stack([d, h]),
    lambda cp, d, h: cp.ascontiguousarray(h),
    lambda cp, d, h: d.dot(h),
    lambda cp, d, h: d + [1.0, 2.0, 3.0],
], ids=["binop", "reflected", "ufunc", "where", "stack", "ascontiguousarray", "method", "list"])
def test_numpy_operands_of_device_functions_raise(cp, op):
    d, h = cp.ones(3), np.ones(3)
    with pytest.raises(TypeError, match=r"Unsupported type|incorrect type"):
        op(cp, d, h)


def test_scalars_and_numpy_scalars_are_fine_operands(cp):
    d = cp.ones(3)
    assert isinstance(d * np.float32(2) + 1, cp.ndarray)


def test_only_cupys_names_and_keywords(cp):
    import cupyx.scipy.fft

    with pytest.raises(_api.CupyApiError, match=r"has no attribute 'no_such_function'"):
        cp.no_such_function  # noqa: B018
    with pytest.raises(_api.CupyApiError, match=r"'cupy.ndarray' object has no attribute"):
        cp.ones(2).no_such_method  # noqa: B018
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'workers'"):
        cupyx.scipy.fft.rfft(cp.ones(8), workers=2)  # scipy.fft has it, cupyx does not
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'like'"):
        cp.zeros(3, like=None)
    assert "rfft" in _api.module_entries("cupyx.scipy.fft")


def test_numpy_functions_dispatch_to_the_device(cp):
    d = cp.arange(4.0)
    assert isinstance(np.sum(d), cp.ndarray)
    assert isinstance(np.exp(d), cp.ndarray)  # __array_ufunc__


def test_allow_synchronize_false_refuses_transfers_out(cp):
    import cupyx

    d = cp.arange(3.0)
    with cupyx.allow_synchronize(False):
        d2 = d * 2  # device work is fine
        with pytest.raises(cupyx.DeviceSynchronized):
            d2.get()
        with pytest.raises(cupyx.DeviceSynchronized):
            float(d2[0])
    assert d2.get().tolist() == [0.0, 2.0, 4.0]


def test_device_queries(cp):
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    assert b"stand-in" in props["name"]
    free, total = cp.cuda.runtime.memGetInfo()
    assert 0 < free <= total
    with cupy_standin.count_transfers() as c:
        cp.cuda.get_current_stream().synchronize()
        assert c.synchronize == 1


def test_backend_reaches_the_standin(cp):
    from stemgpu.backend import is_cupy_array, resolve_backend, to_host

    be = resolve_backend("cupy")
    assert be.xp is cp and be.is_gpu and "stand-in" in be.device_name
    d = be.asarray(np.zeros(2))
    assert is_cupy_array(d) and isinstance(to_host(d), np.ndarray)


def _kernel_args(cp, m=3, k=11):
    from stemgpu.atoms.cuda import kernel_name

    name = kernel_name("gaussian", "mle", "float32", "float64")
    yy, xx = np.mgrid[0:k, 0:k]
    img = (100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10).astype(np.float32)
    stack = cp.asarray(np.stack([img] * 2))
    args = [stack, np.int32(2), np.int32(k), np.int32(k), cp.zeros(m, dtype=cp.int32),
            cp.zeros((m, 2), dtype=cp.int32), cp.asarray(np.tile([90.0, 5, 5, 1.8, 8], (m, 1))),
            np.int64(m), np.int32(k), np.float64(1.0), np.int32(50), np.float64(1e-7),
            np.uintp(0), cp.empty((m, 5)), cp.empty((m, 5)), cp.empty((m, 5, 5)), cp.empty(m),
            cp.empty(m, dtype=cp.int32), cp.empty(m, dtype=cp.int8)]
    return name, args


def test_raw_module_launch_runs_the_host_build(cp):
    from host_build import find_nvcc

    from stemgpu.atoms.cuda import nvrtc_options, read_source

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed (no host build)")
    name, args = _kernel_args(cp)
    mod = cp.RawModule(code=read_source(), options=nvrtc_options(), name_expressions=(name,))
    kern = mod.get_function(name)
    with cupy_standin.count_transfers() as c:
        kern((1,), (128,), tuple(args))
        assert c.launches == 1 and c.d2h == 0
    np.testing.assert_allclose(args[13].get()[:, 1:3], [[5.3, 4.8]] * 3, atol=1e-3)


@pytest.mark.parametrize("index,bad,match", [
    (1, 2, r"'n_frames' \(int\) must be numpy.int32; got int"),
    (7, np.int32(3), r"'n_fits' \(long long\) must be numpy.int64"),
    (6, "float32", r"'init' must be float64"),
    (4, "numpy", r"'frame_index' is a numpy.ndarray"),
    (13, "short", r"'params' has 10 elements; the kernel indexes 15"),
    (5, "strided", r"'origins' must be C-contiguous"),
])
def test_kernel_launch_checks_arguments_as_the_device_needs(cp, index, bad, match):
    from host_build import find_nvcc

    from stemgpu.atoms.cuda import read_source

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed (no host build)")
    name, args = _kernel_args(cp)
    arg = args[index]
    args[index] = {"float32": lambda: arg.astype(cp.float32), "numpy": lambda: arg.get(),
                   "short": lambda: cp.empty((2, 5)),
                   "strided": lambda: cp.zeros((2, 3), dtype=cp.int32).T}.get(
                       bad, lambda: bad)() if isinstance(bad, str) else bad
    kern = cp.RawModule(code=read_source(), name_expressions=(name,)).get_function(name)
    with pytest.raises((TypeError, ValueError), match=match):
        kern((1,), (128,), tuple(args))


def test_kernel_grid_must_cover_every_fit(cp):
    from host_build import find_nvcc

    from stemgpu.atoms.cuda import read_source

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed (no host build)")
    name, args = _kernel_args(cp, m=200)
    kern = cp.RawModule(code=read_source(), name_expressions=(name,)).get_function(name)
    with pytest.raises(ValueError, match=r"do not cover n_fits=200"):
        kern((1,), (128,), tuple(args))
    with pytest.raises(_api.CupyApiError, match=r"not given in name_expressions"):
        cp.RawModule(code=read_source(), name_expressions=()).get_function(name)


def test_gpu_tests_carry_the_standin_marker(request):
    assert cupy_standin.active()
    assert request.config.getini("markers") and any(
        m.startswith("standin:") for m in request.config.getini("markers"))
