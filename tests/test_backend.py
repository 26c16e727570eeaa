"""Backend dispatch: every precedence rule and every error message."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import stemgpu
from stemgpu import backend as bk


class _FakeCupyArray:
    """Stands in for a CuPy array: only its module name matters to dispatch."""


_FakeCupyArray.__module__ = "cupy._core.core"


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install a fake, working 'cupy' (one device) and restore caches afterwards."""

    def install(device_count=1, runtime_error=None):
        cupy = types.ModuleType("cupy")
        runtime = types.SimpleNamespace()

        def get_count():
            if runtime_error is not None:
                raise runtime_error
            return device_count

        runtime.getDeviceCount = get_count
        cupy.cuda = types.SimpleNamespace(runtime=runtime)
        cupyx = types.ModuleType("cupyx")
        scipy_mod = types.ModuleType("cupyx.scipy")
        mods = {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": scipy_mod}
        for sub in ("fft", "ndimage", "linalg"):
            mods[f"cupyx.scipy.{sub}"] = types.ModuleType(f"cupyx.scipy.{sub}")
            setattr(scipy_mod, sub, mods[f"cupyx.scipy.{sub}"])
        cupyx.scipy = scipy_mod
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        bk._clear_caches()
        return cupy

    yield install
    bk._clear_caches()


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    bk._clear_caches()
    yield
    bk._clear_caches()


def test_numpy_backend_namespaces():
    be = bk.resolve_backend("numpy")
    import scipy.fft
    import scipy.ndimage

    assert be.xp is np and be.fft is scipy.fft and be.ndimage is scipy.ndimage
    assert not be.is_gpu
    assert be.free_memory() > 0
    assert "CPU" in be.device_name
    be.synchronize()


def test_keyword_beats_everything(monkeypatch, fake_cupy):
    fake_cupy()
    monkeypatch.setenv("STEMGPU_BACKEND", "cupy")
    stemgpu.set_backend("cupy")
    with stemgpu.use_backend("cupy"):
        assert bk.resolve_backend("numpy", _FakeCupyArray()).name == "numpy"


def test_cupy_input_beats_context_global_and_env(monkeypatch, fake_cupy):
    fake_cupy()
    monkeypatch.setenv("STEMGPU_BACKEND", "numpy")
    stemgpu.set_backend("numpy")
    with stemgpu.use_backend("numpy"):
        assert bk.resolve_backend(None, np.zeros(2), _FakeCupyArray()).name == "cupy"


def test_context_beats_global(fake_cupy):
    fake_cupy()
    stemgpu.set_backend("cupy")
    with stemgpu.use_backend("numpy"):
        assert stemgpu.get_backend().name == "numpy"
    assert stemgpu.get_backend().name == "cupy"


def test_context_restores_previous_on_exit_and_error():
    stemgpu.set_backend("numpy")
    with pytest.raises(RuntimeError, match="inside"):
        with stemgpu.use_backend("numpy"):
            raise RuntimeError("inside")
    assert bk._context_choice.get() is None


def test_global_beats_env(monkeypatch, fake_cupy):
    fake_cupy()
    monkeypatch.setenv("STEMGPU_BACKEND", "cupy")
    stemgpu.set_backend("numpy")
    assert stemgpu.get_backend().name == "numpy"


def test_env_beats_auto(monkeypatch, fake_cupy):
    fake_cupy()
    monkeypatch.setenv("STEMGPU_BACKEND", "numpy")
    assert stemgpu.get_backend().name == "numpy"
    monkeypatch.setenv("STEMGPU_BACKEND", "cupy")
    assert stemgpu.get_backend().name == "cupy"


def test_auto_picks_cupy_when_usable(monkeypatch, fake_cupy):
    fake_cupy()
    monkeypatch.delenv("STEMGPU_BACKEND", raising=False)
    assert stemgpu.get_backend().name == "cupy"


def test_auto_falls_back_to_numpy_silently(monkeypatch, no_cupy, recwarn):
    monkeypatch.delenv("STEMGPU_BACKEND", raising=False)
    assert bk.resolve_backend("auto").name == "numpy"
    assert stemgpu.get_backend().name == "numpy"
    assert len(recwarn) == 0


def test_unknown_backend_keyword():
    with pytest.raises(ValueError, match=r"backend='torch' is not a known backend; accepted"):
        bk.resolve_backend("torch")


def test_unknown_backend_set_and_context():
    with pytest.raises(ValueError, match=r"name='jax' is not a known backend"):
        stemgpu.set_backend("jax")
    with pytest.raises(ValueError, match=r"name=3 is not a known backend"):
        with stemgpu.use_backend(3):
            pass


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("STEMGPU_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"environment variable STEMGPU_BACKEND='gpu'"):
        stemgpu.get_backend()


def test_explicit_cupy_without_cupy_says_not_installed(no_cupy):
    with pytest.raises(
        stemgpu.BackendUnavailableError,
        match=r"CuPy is not installed.*pip install 'stemgpu\[cuda12\]'",
    ):
        bk.resolve_backend("cupy")


def test_explicit_cupy_without_driver(fake_cupy):
    fake_cupy(runtime_error=RuntimeError("cudaErrorInsufficientDriver"))
    with pytest.raises(
        stemgpu.BackendUnavailableError,
        match=r"CUDA driver is not usable.*cudaErrorInsufficientDriver.*stemgpu\[cuda13\]",
    ):
        bk.resolve_backend("cupy")


def test_explicit_cupy_without_device(fake_cupy):
    fake_cupy(device_count=0)
    with pytest.raises(stemgpu.BackendUnavailableError, match=r"reports no CUDA device"):
        bk.resolve_backend("cupy")


def test_set_backend_cupy_fails_early(no_cupy):
    with pytest.raises(stemgpu.BackendUnavailableError, match=r"backend='cupy' was requested"):
        stemgpu.set_backend("cupy")
    assert bk._global_choice is None


def test_available_backends_reports_reason(no_cupy):
    report = stemgpu.available_backends()
    assert report["numpy"] == "available"
    assert "CuPy is not installed" in report["cupy"]


def test_backend_object_passthrough():
    be = bk.resolve_backend("numpy")
    assert bk.resolve_backend(be) is be


def test_asarray_and_to_numpy_roundtrip():
    be = bk.resolve_backend("numpy")
    a = be.asarray([[1, 2], [3, 4]], dtype=np.float32)
    assert a.dtype == np.float32
    assert be.to_numpy(a) is not None and be.to_numpy(a).tolist() == [[1, 2], [3, 4]]


def test_import_pulls_in_no_heavy_module():
    # Import time itself is measured with `python -X importtime -c "import stemgpu"`, not here.
    code = (
        "import sys; import stemgpu; "
        "print([m for m in ('cupy', 'sidpy', 'matplotlib', 'pyNSID', 'dask', 'scipy') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
def test_cupy_backend_on_device():
    import cupy

    be = bk.resolve_backend("cupy")
    a = be.asarray(np.arange(4.0))
    assert isinstance(a, cupy.ndarray)
    assert be.to_numpy(a * 2).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert be.free_memory() > 0 and be.device_name


def test_incomplete_cuda_libraries_named_and_auto_falls_back(monkeypatch, fake_cupy):
    # A device exists but e.g. cuBLAS is missing: importing cupyx.scipy.linalg fails.
    fake_cupy()
    monkeypatch.setitem(sys.modules, "cupyx.scipy.linalg", None)
    bk._clear_caches()
    with pytest.raises(bk.BackendUnavailableError,
                       match=r"backend='cupy' was requested but CuPy's CUDA libraries are "
                             r"incomplete .*pip install 'stemgpu\[cuda12\]'"):
        bk.resolve_backend("cupy")
    assert bk.resolve_backend("auto").name == "numpy"
    assert "incomplete" in bk.available_backends()["cupy"]  # what `stemgpu info` shows
