"""Where the raw CUDA sources live, how they are compiled, and the host build used by tests.

This is the *one* definition of the NVRTC options and kernel name expressions: the runtime
loader (:mod:`stemgpu.atoms.cuda`, through ``cupy.RawModule``) and the CI compile test both
call :func:`nvrtc_options` and :func:`name_expressions`, so what CI compiles is what users run.

The sources are found in a source checkout (``<repo>/kernels``) or in an installed wheel
(package ``stemgpu.kernels``, mapped from ``kernels/`` by ``pyproject.toml``).

:func:`build_host_library` compiles the same ``__host__ __device__`` math for the CPU with
``nvcc`` into a shared library loaded with :mod:`ctypes` (no GPU needed), so the kernel's fits
can be compared with the NumPy path on machines without a device.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "ESTIMATORS",
    "KERNEL_SOURCE",
    "MODEL_STRUCTS",
    "kernel_dir",
    "kernel_name",
    "name_expressions",
    "nvrtc_options",
    "read_source",
    "build_host_library",
]

#: The file holding the ``__global__`` kernels (it includes the ``.cuh`` headers).
KERNEL_SOURCE = "lm_fit.cu"
#: Host-build translation unit (extern "C" wrappers over the same math).
HOST_SOURCE = "host_api.cu"
#: Registry model name -> C++ struct (one ``model_<name>.cuh`` per model).
MODEL_STRUCTS = {"gaussian": "stemgpu::Gaussian", "elliptical": "stemgpu::Elliptical"}
#: Estimator name -> template value of ``EST``.
ESTIMATORS = {"mle": 0, "lsq": 1}
#: (image dtype, compute dtype) pairs instantiated: float32 images may be fitted in float32
#: or float64 arithmetic; float64 images in float64.
DTYPE_PAIRS = (("float32", "float32"), ("float32", "float64"), ("float64", "float64"))
_CTYPE = {"float32": "float", "float64": "double"}


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` / ``.cuh`` sources (source checkout or installed wheel).

    Examples
    --------
    >>> from stemgpu.kernel_sources import kernel_dir
    >>> (kernel_dir() / "lm_fit.cu").is_file()
    True
    """
    checkout = Path(__file__).resolve().parent.parent / "kernels"
    if (checkout / KERNEL_SOURCE).is_file():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("stemgpu.kernels")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / KERNEL_SOURCE).is_file():
                return Path(loc)
    raise FileNotFoundError(
        f"stemgpu CUDA sources ({KERNEL_SOURCE}) not found in {checkout} nor in the installed "
        "package stemgpu.kernels; reinstall stemgpu"
    )


def read_source(name: str = KERNEL_SOURCE) -> str:
    """Text of one kernel source file (from :func:`kernel_dir`).

    Examples
    --------
    >>> from stemgpu.kernel_sources import read_source
    >>> "lm_fit_kernel" in read_source()
    True
    """
    return (kernel_dir() / name).read_text()


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options the runtime loader passes (the architecture is added by CuPy / the test).

    ``-I`` lets ``lm_fit.cu`` include its headers from :func:`kernel_dir`; no fast-math, since
    the LM tests (``sg_finite``, convergence thresholds) rely on IEEE semantics.
    """
    return ("--std=c++17", f"-I{kernel_dir()}")


def kernel_name(model: str, estimator: str, image_dtype: str, compute_dtype: str) -> str:
    """Name expression of one specialisation, e.g.
    ``stemgpu::lm_fit_kernel<float, float, stemgpu::Gaussian, 0>``."""
    if model not in MODEL_STRUCTS:
        raise ValueError(f"model={model!r} has no CUDA kernel; accepted: "
                         + ", ".join(repr(m) for m in MODEL_STRUCTS))
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not known; accepted: 'mle', 'lsq'")
    if (image_dtype, compute_dtype) not in DTYPE_PAIRS:
        raise ValueError(f"(image, compute) dtypes {(image_dtype, compute_dtype)!r} are not "
                         f"instantiated; accepted: {DTYPE_PAIRS!r}")
    return (f"stemgpu::lm_fit_kernel<{_CTYPE[image_dtype]}, {_CTYPE[compute_dtype]}, "
            f"{MODEL_STRUCTS[model]}, {ESTIMATORS[estimator]}>")


def name_expressions() -> tuple[str, ...]:
    """Every specialisation the loader instantiates (models x estimators x dtype pairs).

    Examples
    --------
    >>> from stemgpu.kernel_sources import name_expressions
    >>> len(name_expressions())
    12
    """
    return tuple(kernel_name(m, e, i, c) for m in MODEL_STRUCTS for e in ESTIMATORS
                 for i, c in DTYPE_PAIRS)


# --- host build (tests) -------------------------------------------------------------------

def find_nvcc() -> str | None:
    """Path of ``nvcc`` (PATH, then ``$CUDA_HOME/bin``), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(kernel_dir().glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def build_host_library(cache_dir: str | None = None) -> ctypes.CDLL:
    """Compile ``host_api.cu`` for the CPU with nvcc and load it with ctypes.

    The library is cached under ``cache_dir`` (default: a ``stemgpu-hostbuild`` folder in the
    temporary directory) keyed by a hash of the sources, so edits rebuild it.

    Raises
    ------
    RuntimeError
        When nvcc is missing or the compilation fails (the compiler output is included).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc was not found on PATH nor in $CUDA_HOME/bin")
    root = Path(cache_dir or Path(tempfile.gettempdir()) / "stemgpu-hostbuild")
    root.mkdir(parents=True, exist_ok=True)
    lib = root / f"stemgpu_host_{_sources_digest()}.so"
    if not lib.is_file():
        tmp = root / f".{lib.name}.{os.getpid()}"
        cmd = [nvcc, "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17",
               "-DSTEMGPU_HOST_BUILD", f"-I{kernel_dir()}", str(kernel_dir() / HOST_SOURCE),
               "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"host build failed ({' '.join(cmd)}):\n{res.stdout}{res.stderr}")
        os.replace(tmp, lib)  # atomic: concurrent test processes never load a partial file
    dll = ctypes.CDLL(str(lib))
    c = ctypes
    dll.stemgpu_model_count.restype = c.c_int
    dll.stemgpu_model_name.restype = c.c_char_p
    dll.stemgpu_model_name.argtypes = [c.c_int]
    dll.stemgpu_model_params.restype = c.c_char_p
    dll.stemgpu_model_params.argtypes = [c.c_int]
    dll.stemgpu_model_nparams.restype = c.c_int
    dll.stemgpu_model_nparams.argtypes = [c.c_int]
    dll.stemgpu_model_layout.argtypes = [c.c_int, c.c_void_p]
    dll.stemgpu_status_codes.argtypes = [c.c_void_p]
    dll.stemgpu_lm_constants.argtypes = [c.c_void_p]
    dll.stemgpu_host_lm_fit.restype = c.c_int
    dll.stemgpu_host_lm_fit.argtypes = (
        [c.c_int] * 4 + [c.c_void_p, c.c_int, c.c_int, c.c_int] + [c.c_void_p] * 3
        + [c.c_longlong, c.c_int, c.c_double, c.c_int, c.c_double] + [c.c_void_p] * 7)
    return dll


def host_lm_fit(image_or_stack, frame_index, origins, init, *, window, model="gaussian",
                estimator="mle", max_iter=50, tol=1e-7, gain=1.0, offset=None,
                compute_dtype=None):
    """Run the kernel math on the CPU (host build) over NumPy arrays; returns an LMOutput.

    Same arguments as :func:`stemgpu.atoms.cuda.lm_fit_kernel`; for tests and debugging.
    """
    import numpy as np

    from .atoms.lm import LMOutput
    from .atoms.models import get_model

    dll = build_host_library()
    stack = np.asarray(image_or_stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.dtype not in (np.float32, np.float64):
        stack = stack.astype(np.float32)
    stack = np.ascontiguousarray(stack)
    cdt = np.dtype(compute_dtype or np.float64)  # the lm.py spec: float64 arithmetic
    if stack.dtype == np.float64 and cdt == np.float32:
        raise ValueError("compute_dtype=float32 is not instantiated for float64 images")
    mdl = get_model(model)
    mid = list(MODEL_STRUCTS).index(mdl.name)
    n = len(init)
    p = mdl.n_params
    fi = np.ascontiguousarray(np.broadcast_to(np.asarray(frame_index, dtype=np.int32), (n,)))
    org = np.ascontiguousarray(np.asarray(origins), dtype=np.int32).reshape(n, 2)
    ini = np.ascontiguousarray(init, dtype=np.float64).reshape(n, p)
    off = None if offset is None else np.ascontiguousarray(offset, dtype=cdt)
    params = np.empty((n, p))
    errors = np.empty((n, p))
    cov = np.empty((n, p, p))
    chi2 = np.empty(n)
    n_iter = np.empty(n, dtype=np.int32)
    status = np.empty(n, dtype=np.int8)
    rc = dll.stemgpu_host_lm_fit(
        mid, ESTIMATORS[estimator], int(stack.dtype == np.float64), int(cdt == np.float64),
        stack.ctypes.data, stack.shape[0], stack.shape[1], stack.shape[2], fi.ctypes.data,
        org.ctypes.data, ini.ctypes.data, n, int(window), float(gain), int(max_iter),
        float(tol), None if off is None else off.ctypes.data, params.ctypes.data,
        errors.ctypes.data, cov.ctypes.data, chi2.ctypes.data, n_iter.ctypes.data,
        status.ctypes.data)
    if rc != 0:
        raise ValueError(f"no host kernel for model={mdl.name!r}, estimator={estimator!r}")
    return LMOutput(params, errors, cov, chi2, n_iter, status)
