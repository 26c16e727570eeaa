"""Backend dispatch: the one place that knows CuPy exists.

Every algorithm in stemgpu is written once against an array namespace ``xp`` and asks this
module for it, together with the matching ``fft``, ``ndimage`` and ``linalg`` modules. The
backend is chosen with this precedence (highest first):

1. the ``backend=`` keyword of a public function;
2. a CuPy array among the inputs (the data already live on the GPU);
3. :func:`use_backend` (context manager), then :func:`set_backend` (global);
4. the environment variable ``STEMGPU_BACKEND``;
5. ``"auto"``: CuPy when it imports *and* a CUDA device is usable, otherwise NumPy, silently.

Asking for ``"cupy"`` explicitly on a machine without a usable GPU raises
:class:`BackendUnavailableError` saying why and how to install the GPU extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailableError",
    "HostCopyMixin",
    "available_backends",
    "get_backend",
    "is_cupy_array",
    "resolve_backend",
    "set_backend",
    "to_host",
    "use_backend",
]

#: Accepted values of ``backend=``, :func:`set_backend` and ``STEMGPU_BACKEND``.
BACKEND_NAMES = ("numpy", "cupy", "auto")
ENV_VAR = "STEMGPU_BACKEND"
_INSTALL_HINT = (
    "Install the GPU extra matching your CUDA driver: pip install 'stemgpu[cuda12]' "
    "(CUDA 12.x) or pip install 'stemgpu[cuda13]' (CUDA 13.x)"
)

_global_choice: str | None = None
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stemgpu_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (the message says why)."""


@dataclass(frozen=True)
class Backend:
    """An array backend: the namespaces an algorithm needs, plus host/device moves.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        The array namespace (``numpy`` or ``cupy``).
    fft, ndimage, linalg : module
        ``scipy.fft``/``scipy.ndimage``/``scipy.linalg`` or their ``cupyx.scipy`` twins.

    Examples
    --------
    >>> import stemgpu
    >>> be = stemgpu.backend.resolve_backend("numpy")
    >>> be.name, be.xp.__name__
    ('numpy', 'numpy')
    >>> be.to_numpy(be.asarray([1.0, 2.0])).tolist()
    [1.0, 2.0]
    """

    name: str
    xp: ModuleType
    fft: ModuleType
    ndimage: ModuleType
    linalg: ModuleType

    @property
    def is_gpu(self) -> bool:
        """True when arrays of this backend live on a CUDA device."""
        return self.name == "cupy"

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Move or convert ``array`` to this backend (one transfer; no copy if already there)."""
        if self.name == "numpy":
            if is_cupy_array(array):
                array = array.get()
            return _numpy().asarray(array, dtype=dtype)
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array: Any) -> Any:
        """Return ``array`` as a NumPy array (device-to-host copy for CuPy arrays)."""
        return to_host(array)

    def synchronize(self) -> None:
        """Wait for all queued device work (no-op on NumPy); use before timing."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    @property
    def device_name(self) -> str:
        """Human-readable device name, e.g. ``'NVIDIA H100 80GB HBM3'`` or ``'CPU (2 cores)'``."""
        if self.name == "cupy":
            dev = self.xp.cuda.Device()
            props = self.xp.cuda.runtime.getDeviceProperties(dev.id)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        return f"CPU ({os.cpu_count()} cores)"

    def free_memory(self) -> int:
        """Free memory in bytes on the device (GPU) or host (CPU) that arrays would use."""
        if self.name == "cupy":
            free, _total = self.xp.cuda.runtime.memGetInfo()
            return int(free)
        return _host_available_memory()

    @property
    def fft_kwargs(self) -> dict:
        """Extra keywords of this backend's FFTs: every core for ``scipy.fft`` (NumPy);
        none for ``cupyx.scipy.fft``, which has no ``workers`` argument."""
        return {"workers": -1} if self.name == "numpy" else {}

    @property
    def cpu_workers(self) -> int:
        """Threads a stage may run side by side: one per usable CPU core on NumPy (its
        array loops release the GIL); one on a GPU, whose kernels queue on one stream."""
        if self.is_gpu:
            return 1
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)

    def frames_per_batch(self, shape: tuple[int, ...], bytes_per_pixel: int, *,
                         batch_size: Any = "auto", gpu_fraction: float = 0.25,
                         cpu_fraction: float = 0.125, cpu_cap: int = 256 * 2**20,
                         max_frames: int | None = None) -> int:
        """How many frames of ``shape = (n, h, w)`` one batch of a stage may hold.

        A stage states its working memory (``bytes_per_pixel`` per frame pixel); the batch
        then fills ``gpu_fraction`` of the free device memory, or on the CPU the smaller of
        ``cpu_fraction`` of the available host memory and ``cpu_cap`` bytes (a cache-friendly
        size: larger CPU batches are not faster). An explicit integer ``batch_size`` is
        checked and returned as is.

        Examples
        --------
        >>> import stemgpu
        >>> be = stemgpu.backend.resolve_backend("numpy")
        >>> be.frames_per_batch((10, 64, 64), 48, batch_size=4)
        4
        >>> 1 <= be.frames_per_batch((10, 64, 64), 48) <= 10
        True
        """
        from ._checks import check_batch_size

        batch_size = check_batch_size(batch_size)
        if batch_size != "auto":
            return batch_size
        n = int(shape[0])
        per_frame = max(1, int(bytes_per_pixel) * int(shape[-2]) * int(shape[-1]))
        if self.is_gpu:
            budget = int(self.free_memory() * gpu_fraction)
        else:
            budget = min(int(self.free_memory() * cpu_fraction), cpu_cap)
        cap = n if max_frames is None else min(n, max_frames)
        return int(max(1, min(cap, budget // per_frame)))

    def __repr__(self) -> str:  # short, for notebooks
        return f"Backend({self.name!r})"


class HostCopyMixin:
    """``to_numpy()`` for result dataclasses: a copy whose NumPy/CuPy array fields are
    NumPy arrays (device-to-host for CuPy) and whose dict fields are shallow copies.

    Any other field (numbers, strings, a streamed file-backed target) is kept as is.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> import numpy as np
    >>> from stemgpu.backend import HostCopyMixin
    >>> @dataclass(frozen=True)
    ... class R(HostCopyMixin):
    ...     x: object
    ...     parameters: dict
    >>> r = R(np.zeros(2), {"a": 1})
    >>> c = r.to_numpy()
    >>> c.x is r.x, c.x.tolist(), c.parameters == r.parameters
    (False, [0.0, 0.0], True)
    """

    def to_numpy(self):
        """A copy with every array field as a NumPy array (see the class docstring)."""
        import dataclasses

        np_ = _numpy()
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if is_cupy_array(v) or isinstance(v, np_.ndarray):
                out[f.name] = to_host(v, copy=True)
            elif isinstance(v, dict):
                out[f.name] = dict(v)
        return dataclasses.replace(self, **out)


def _numpy() -> ModuleType:
    import numpy

    return numpy


def _host_available_memory() -> int:
    """Available host memory in bytes (MemAvailable on Linux, else a physical-pages estimate)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


def is_cupy_array(array: Any) -> bool:
    """True for a CuPy ndarray, decided without importing CuPy.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.backend import is_cupy_array
    >>> is_cupy_array(np.zeros(3))
    False
    """
    return type(array).__module__.split(".")[0] == "cupy"


def to_host(array: Any, copy: bool = False) -> Any:
    """``array`` as a NumPy array, whichever backend it lives on.

    NumPy input is returned as is unless ``copy`` (a device array is always copied).

    Examples
    --------
    >>> from stemgpu.backend import to_host
    >>> to_host([1, 2]).tolist()
    [1, 2]
    """
    if is_cupy_array(array):
        return array.get()
    return _numpy().array(array) if copy else _numpy().asarray(array)


def _check_name(name: Any, argument: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(
            f"{argument}={name!r} is not a known backend; accepted values are "
            + ", ".join(repr(n) for n in BACKEND_NAMES)
        )
    return name.lower()


#: Test-suite hook, not for users: with ``STEMGPU_CUPY_STANDIN=1`` "CuPy" is the strict
#: NumPy-backed stand-in ``cupy_standin`` (``tests/cupy_standin``, which must be importable).
STANDIN_ENV_VAR = "STEMGPU_CUPY_STANDIN"


def _import_cupy() -> ModuleType:
    """``import cupy``, or the test suite's CuPy stand-in (see :data:`STANDIN_ENV_VAR`)."""
    if os.environ.get(STANDIN_ENV_VAR) == "1":
        importlib.import_module("cupy_standin").install()  # puts it in sys.modules once
    return importlib.import_module("cupy")


def _probe_cupy() -> tuple[ModuleType | None, str]:
    """Import CuPy and check that a CUDA device is usable.

    Returns ``(cupy, "")`` on success, or ``(None, reason)`` with a sentence saying why not.
    """
    try:
        cupy = _import_cupy()
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return None, f"CuPy is not installed or failed to import ({type(exc).__name__}: {exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError when no driver is loaded
        return None, (
            "CuPy imported but the CUDA driver is not usable "
            f"({type(exc).__name__}: {exc}); is an NVIDIA driver installed?"
        )
    if count < 1:
        return None, "CuPy imported and the CUDA driver answered, but it reports no CUDA device"
    return cupy, ""


@functools.cache
def _make_backend(name: str) -> Backend:
    if name == "numpy":
        import numpy
        import scipy.fft
        import scipy.linalg
        import scipy.ndimage

        return Backend("numpy", numpy, scipy.fft, scipy.ndimage, scipy.linalg)
    cupy, reason = _probe_cupy()
    if cupy is None:
        raise BackendUnavailableError(
            f"backend='cupy' was requested but {reason}. {_INSTALL_HINT}."
        )
    try:
        import cupyx.scipy.fft
        import cupyx.scipy.linalg
        import cupyx.scipy.ndimage
    except ImportError as exc:  # e.g. cuBLAS / cuSOLVER / cuFFT libraries missing
        raise BackendUnavailableError(
            f"backend='cupy' was requested but CuPy's CUDA libraries are incomplete ({exc}). "
            f"{_INSTALL_HINT}."
        ) from exc

    return Backend("cupy", cupy, cupyx.scipy.fft, cupyx.scipy.ndimage, cupyx.scipy.linalg)


@functools.lru_cache(maxsize=1)
def _auto_name() -> str:
    cupy, _reason = _probe_cupy()
    if cupy is None:
        return "numpy"
    try:  # a device but incomplete CUDA libraries: "auto" stays silent and uses NumPy
        _make_backend("cupy")
    except BackendUnavailableError:
        return "numpy"
    return "cupy"


def _clear_caches() -> None:
    """Forget probed backends (tests use this after faking CuPy)."""
    _make_backend.cache_clear()
    _auto_name.cache_clear()


def _choice_from_state() -> tuple[str, str]:
    """The backend name from context, global state or environment, and where it came from."""
    ctx = _context_choice.get()
    if ctx is not None:
        return ctx, "use_backend()"
    if _global_choice is not None:
        return _global_choice, "set_backend()"
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}"), ENV_VAR
    return "auto", "default"


def resolve_backend(backend: str | Backend | None = None, *arrays: Any) -> Backend:
    """Resolve the backend for one public call.

    Parameters
    ----------
    backend : {"numpy", "cupy", "auto"}, Backend or None
        The function's ``backend=`` keyword. ``None`` defers to the input arrays, then the
        context/global choice, then ``STEMGPU_BACKEND``, then ``"auto"``.
    *arrays
        The call's input arrays; any CuPy array among them selects CuPy.

    Returns
    -------
    Backend

    Raises
    ------
    ValueError
        If ``backend`` (or ``STEMGPU_BACKEND``) is not one of ``"numpy"``, ``"cupy"``,
        ``"auto"``.
    BackendUnavailableError
        If ``"cupy"`` is asked for and no usable GPU is present.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.backend import resolve_backend
    >>> resolve_backend("numpy", np.zeros(3)).name
    'numpy'
    """
    if isinstance(backend, Backend):
        return backend
    if backend is not None:
        name = _check_name(backend, "backend")
    elif any(is_cupy_array(a) for a in arrays):
        name = "cupy"
    else:
        name, _source = _choice_from_state()
    if name == "auto":
        name = _auto_name()
    return _make_backend(name)


def get_backend() -> Backend:
    """The backend a call without ``backend=`` and without CuPy inputs would use now.

    Examples
    --------
    >>> import stemgpu
    >>> with stemgpu.use_backend("numpy"):
    ...     stemgpu.get_backend().name
    'numpy'
    """
    return resolve_backend(None)


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` clears it).

    Parameters
    ----------
    name : {"numpy", "cupy", "auto"} or None

    Raises
    ------
    ValueError
        For an unknown name.
    BackendUnavailableError
        For ``"cupy"`` on a machine without a usable GPU (checked now, not at first use).

    Examples
    --------
    >>> import stemgpu
    >>> stemgpu.set_backend("numpy")
    >>> stemgpu.get_backend().name
    'numpy'
    >>> stemgpu.set_backend(None)
    """
    global _global_choice
    if name is None:
        _global_choice = None
        return
    checked = _check_name(name, "name")
    if checked == "cupy":
        _make_backend("cupy")  # fail early with the reason
    _global_choice = checked


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting a backend for the calls inside the ``with`` block.

    Examples
    --------
    >>> import stemgpu
    >>> with stemgpu.use_backend("numpy") as be:
    ...     be.name
    'numpy'
    """
    checked = _check_name(name, "name")
    be = resolve_backend(checked)
    token = _context_choice.set(checked)
    try:
        yield be
    finally:
        _context_choice.reset(token)


def available_backends() -> dict[str, str]:
    """Map each backend to ``"available"`` or the reason it is not (for ``stemgpu info``).

    Examples
    --------
    >>> from stemgpu.backend import available_backends
    >>> available_backends()["numpy"]
    'available'
    """
    out = {"numpy": "available"}
    cupy, reason = _probe_cupy()
    if cupy is not None:
        try:  # a device, but are CuPy's CUDA libraries complete?
            _make_backend("cupy")
        except BackendUnavailableError as exc:
            cupy, reason = None, str(exc)
    out["cupy"] = "available" if cupy is not None else reason
    return out


def cupy_loaded() -> bool:
    """True if CuPy has been imported in this process (used by import-time tests)."""
    return "cupy" in sys.modules
