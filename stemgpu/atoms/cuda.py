"""The CUDA path of the fitting: kernel sources, NVRTC options and names, loader, launch.

This module is the one home of the fused CUDA Levenberg-Marquardt kernel (CuPy
``RawModule``, one thread per fit):

- **sources**: :func:`kernel_dir`, :func:`read_source`, :func:`sources_digest`. The ``.cu`` /
  ``.cuh`` files stay in the repository's top-level ``kernels/`` folder (installed as the
  package ``stemgpu.kernels`` by ``pyproject.toml``);
- **compilation**: :func:`nvrtc_options`, :func:`kernel_name`, :func:`name_expressions`, the
  same definitions the CI NVRTC test compiles, so what CI compiles is what users run;
- **loader**: :func:`get_module` (compiled on first use, per device and specialisation);
- **precision**: :func:`auto_compute_dtype` / :func:`device_compute_dtype`, the arithmetic
  ``compute_dtype="auto"`` picks from the device's FP64 rate;
- **launch**: :func:`lm_fit_kernel`.

The kernel (``kernels/lm_fit.cu`` and its headers) reproduces the algorithm specified in
:mod:`stemgpu.atoms.lm` step for step, reading each window straight from the image on the
device (no (N, k, k) copy) and returning the same :class:`~stemgpu.atoms.lm.LMOutput`
(natural parameters, errors, covariance, objective, iterations, status codes of
:mod:`stemgpu.atoms.models`). The models come from the one registry
(:data:`stemgpu.atoms.models.MODELS`, field ``cuda_struct``) and the estimators from
:data:`stemgpu.atoms.models.ESTIMATORS`.

CuPy is only reached through :func:`stemgpu.backend.resolve_backend`; importing this module
does not import CuPy. The CPU build of the same sources for the tests lives in
``tests/host_build.py``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from .._checks import check_choice
from ..backend import resolve_backend
from .lm import LMOutput
from .models import ESTIMATORS, MODELS, check_estimator, get_model

__all__ = [
    "AUTO_FP64_MAX_RATIO",
    "BLOCK",
    "COMPUTE_DTYPES",
    "DTYPE_PAIRS",
    "ESTIMATOR_CODES",
    "HIGH_FP64_CC",
    "KERNEL_SOURCE",
    "auto_compute_dtype",
    "device_compute_dtype",
    "get_module",
    "kernel_dir",
    "kernel_name",
    "lm_fit_kernel",
    "name_expressions",
    "nvrtc_options",
    "read_source",
    "sources_digest",
]

#: The file holding the ``__global__`` kernels (it includes the ``.cuh`` headers).
KERNEL_SOURCE = "lm_fit.cu"
#: Estimator name -> template value of ``EST`` (its position in ``models.ESTIMATORS``).
ESTIMATOR_CODES = {name: code for code, name in enumerate(ESTIMATORS)}
#: (image dtype, compute dtype) pairs instantiated: float32 images may be fitted in float32
#: or float64 arithmetic; float64 images in float64.
DTYPE_PAIRS = (("float32", "float32"), ("float32", "float64"), ("float64", "float64"))
_CTYPE = {"float32": "float", "float64": "double"}
#: Threads per block (one fit per thread; any multiple of 32 works).
BLOCK = 128
#: Values of ``lm_fit_kernel(compute_dtype=...)``.
COMPUTE_DTYPES = ("auto", "float32", "float64")
#: FP32:FP64 throughput ratio up to which ``compute_dtype="auto"`` keeps float64 arithmetic
#: (data-centre GPUs: 2; workstation / consumer cards: 32 or 64).
AUTO_FP64_MAX_RATIO = 4
#: Compute capabilities with a half-rate FP64 unit (P100, V100, A100 / A30, H100 / H200 /
#: GH200, B100 / B200): the fallback when the device does not report its FP64 ratio.
HIGH_FP64_CC = ((6, 0), (7, 0), (8, 0), (9, 0), (10, 0))


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` / ``.cuh`` sources (source checkout or installed wheel).

    Examples
    --------
    >>> from stemgpu.atoms.cuda import kernel_dir
    >>> (kernel_dir() / "lm_fit.cu").is_file()
    True
    """
    checkout = Path(__file__).resolve().parents[2] / "kernels"
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
    >>> from stemgpu.atoms.cuda import read_source
    >>> "lm_fit_kernel" in read_source()
    True
    """
    return (kernel_dir() / name).read_text()


def sources_digest() -> str:
    """Short hash of every ``.cu*`` source (names and bytes): changes with any header edit.

    Examples
    --------
    >>> from stemgpu.atoms.cuda import sources_digest
    >>> len(sources_digest())
    16
    """
    h = hashlib.sha256()
    for p in sorted(kernel_dir().glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options the runtime loader passes (the architecture is added by CuPy / the test).

    ``-I`` lets ``lm_fit.cu`` include its headers from :func:`kernel_dir`; no fast-math, since
    the LM tests (``sg_finite``, convergence thresholds) rely on IEEE semantics.

    Examples
    --------
    >>> from stemgpu.atoms.cuda import nvrtc_options
    >>> nvrtc_options()[0]
    '--std=c++17'
    """
    return ("--std=c++17", f"-I{kernel_dir()}")


def kernel_name(model: str, estimator: str, image_dtype: str, compute_dtype: str) -> str:
    """Name expression of one specialisation.

    Examples
    --------
    >>> from stemgpu.atoms.cuda import kernel_name
    >>> kernel_name("gaussian", "mle", "float32", "float32")
    'stemgpu::lm_fit_kernel<float, float, stemgpu::Gaussian, 0>'
    """
    if model not in MODELS:
        raise ValueError(f"model={model!r} has no CUDA kernel; accepted: "
                         + ", ".join(repr(m) for m in MODELS))
    check_estimator(estimator)
    if (image_dtype, compute_dtype) not in DTYPE_PAIRS:
        raise ValueError(f"(image, compute) dtypes {(image_dtype, compute_dtype)!r} are not "
                         f"instantiated; accepted: {DTYPE_PAIRS!r}")
    return (f"stemgpu::lm_fit_kernel<{_CTYPE[image_dtype]}, {_CTYPE[compute_dtype]}, "
            f"{MODELS[model].cuda_struct}, {ESTIMATOR_CODES[estimator]}>")


def name_expressions() -> tuple[str, ...]:
    """Every specialisation the loader instantiates (models x estimators x dtype pairs).

    Examples
    --------
    >>> from stemgpu.atoms.cuda import name_expressions
    >>> len(name_expressions())
    12
    """
    return tuple(kernel_name(m, e, i, c) for m in MODELS for e in ESTIMATORS
                 for i, c in DTYPE_PAIRS)


def auto_compute_dtype(props) -> str:
    """The kernel arithmetic for a device: ``"float64"`` where FP64 runs at a high rate.

    Parameters
    ----------
    props : mapping
        ``cupy.cuda.runtime.getDeviceProperties(device)``: its
        ``singleToDoublePrecisionPerfRatio`` (FP32:FP64 throughput) decides, float64 up to
        :data:`AUTO_FP64_MAX_RATIO`; without it, the compute capability (``major``,
        ``minor``) is looked up in :data:`HIGH_FP64_CC`.

    Returns
    -------
    str
        ``"float64"`` (the :mod:`stemgpu.atoms.lm` spec exactly; H100 / H200 / A100) or
        ``"float32"`` (workstation and consumer GPUs, FP64 at 1/32-1/64 of FP32).

    Examples
    --------
    >>> from stemgpu.atoms.cuda import auto_compute_dtype
    >>> auto_compute_dtype({"name": b"NVIDIA H200", "major": 9, "minor": 0,
    ...                     "singleToDoublePrecisionPerfRatio": 2})
    'float64'
    >>> auto_compute_dtype({"name": b"NVIDIA RTX A6000", "major": 8, "minor": 6,
    ...                     "singleToDoublePrecisionPerfRatio": 32})
    'float32'
    >>> auto_compute_dtype({"major": 8, "minor": 9})  # no ratio reported: L4 / RTX 40xx
    'float32'
    """
    ratio = props.get("singleToDoublePrecisionPerfRatio")
    if ratio:
        return "float64" if int(ratio) <= AUTO_FP64_MAX_RATIO else "float32"
    cc = (int(props.get("major", 0)), int(props.get("minor", 0)))
    return "float64" if cc in HIGH_FP64_CC else "float32"


@functools.cache
def _device_compute_dtype(device_id: int) -> str:
    cp = resolve_backend("cupy").xp
    return auto_compute_dtype(cp.cuda.runtime.getDeviceProperties(device_id))


def device_compute_dtype(device_id: int | None = None) -> str:
    """:func:`auto_compute_dtype` of a CUDA device (default: the current one), cached."""
    if device_id is None:
        device_id = resolve_backend("cupy").xp.cuda.Device().id
    return _device_compute_dtype(int(device_id))


@functools.cache
def _module_for(device_id: int, name: str):
    cp = resolve_backend("cupy").xp
    with cp.cuda.Device(device_id):
        # CuPy's kernel cache keys on the code string, not on the included headers: a digest
        # of all sources in a trailing comment makes header edits recompile. One module per
        # specialisation: a process compiles only what it launches (CuPy 13 does not reuse
        # its disk cache for modules built with name expressions).
        code = read_source() + f"\n// stemgpu kernel sources {sources_digest()}\n"
        mod = cp.RawModule(code=code, options=nvrtc_options(), name_expressions=(name,))
        mod.compile()
    return mod


def get_module(model: str = "gaussian", estimator: str = "mle", image_dtype: str = "float32",
               compute_dtype: str = "auto"):
    """The compiled ``RawModule`` of one kernel specialisation for the current CUDA device.

    Compiled on first use, once per device and specialisation (see :func:`kernel_name` for
    the accepted combinations; ``compute_dtype="auto"`` resolves as in
    :func:`lm_fit_kernel`); call it ahead of a timed or synchronisation-checked launch to
    keep the compilation out of it.
    """
    cp = resolve_backend("cupy").xp
    check_choice(compute_dtype, "compute_dtype", COMPUTE_DTYPES)
    if image_dtype == "float64":
        compute_dtype = "float64"
    elif compute_dtype == "auto":
        compute_dtype = device_compute_dtype()
    name = kernel_name(get_model(model).name, estimator, image_dtype, compute_dtype)
    return _module_for(cp.cuda.Device().id, name)


def lm_fit_kernel(image_or_stack, frame_index, origins, init, *, window, model="gaussian",
                  estimator="mle", max_iter=50, tol=1e-7, gain=1.0, offset=None,
                  compute_dtype="auto") -> LMOutput:
    """Fit one model per window on the GPU with the fused LM kernel.

    Parameters
    ----------
    image_or_stack : (H, W) or (F, H, W) cupy.ndarray
        Image data (float32 or float64; other dtypes are converted to float32 on the device).
    frame_index : (M,) int array or int
        Frame of each fit (0 for a single image).
    origins : (M, 2) int array
        Image (row, col) of each window's ``[0, 0]`` pixel. Windows not fully inside the
        image get status OUT_OF_BOUNDS (parameters = ``init``, infinite errors).
    init : (M, P) array
        Natural initial parameters (model order, image coordinates).
    window : int
        Window side k (px).
    model : str
        Registered model name (``"gaussian"``, ``"elliptical"``).
    estimator : {"mle", "lsq"}
    max_iter : int
    tol : float
    gain : float
        Counts per data unit.
    offset : (M, k, k) array, optional
        Known additive model part in data units (fitted neighbouring columns).
    compute_dtype : {"auto", "float64", "float32"}
        Arithmetic of the fit. ``"float64"`` follows the :mod:`stemgpu.atoms.lm` spec
        exactly. ``"float32"`` (float32 images only; float64 images always use float64) runs
        model, objective, sums, accept / converge decisions and solves in float32, with
        compensated sums, a log1p deviance, Jacobi-scaled Cholesky and a convergence
        threshold kept above float32 rounding (``kernels/lm.cuh``): on well-posed fits it
        takes the same status decisions as float64 and positions agree to ~3e-4 px (< 1 % of
        the CRLB; measured on the host build). ``"auto"`` (default):
        :func:`device_compute_dtype`, float64 on data-centre GPUs, float32 where FP64 is slow.

    Returns
    -------
    LMOutput
        CuPy arrays, as :func:`stemgpu.atoms.lm.lm_fit`.

    Raises
    ------
    ValueError
        For unknown models / estimators / dtypes or inconsistent shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.backend import available_backends
    >>> if available_backends()["cupy"] == "available":  # doctest: +SKIP
    ...     import cupy as cp
    ...     from stemgpu.atoms.cuda import lm_fit_kernel
    ...     yy, xx = np.mgrid[0:11, 0:11]
    ...     img = cp.asarray(100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10)
    ...     out = lm_fit_kernel(img, 0, cp.zeros((1, 2), dtype=cp.int32),
    ...                         cp.asarray([[90.0, 5, 5, 1.8, 8]]), window=11)
    ...     print(np.round(cp.asnumpy(out.params[0, 1:3]), 3).tolist())
    [5.3, 4.8]
    """
    be = resolve_backend("cupy")
    cp = be.xp
    mdl = get_model(model)
    check_estimator(estimator)
    check_choice(compute_dtype, "compute_dtype", COMPUTE_DTYPES)
    stack = cp.asarray(image_or_stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"image_or_stack must be 2-D or 3-D; got shape {stack.shape}")
    if stack.dtype not in (cp.float32, cp.float64):
        stack = stack.astype(cp.float32)
    stack = cp.ascontiguousarray(stack)
    image_dtype = np.dtype(stack.dtype).name
    if image_dtype == "float64":
        compute_dtype = "float64"
    elif compute_dtype == "auto":
        compute_dtype = device_compute_dtype()
    k = int(window)
    if k < 1:
        raise ValueError(f"window must be a positive number of pixels; got {window!r}")
    p = mdl.n_params
    init = cp.ascontiguousarray(cp.asarray(init, dtype=cp.float64))
    if init.ndim != 2 or init.shape[1] != p:
        raise ValueError(f"init must have shape (M, {p}) for model {mdl.name!r}; got "
                         f"{init.shape}")
    m = init.shape[0]
    fi = cp.ascontiguousarray(cp.broadcast_to(cp.asarray(frame_index, dtype=cp.int32), (m,)))
    org = cp.ascontiguousarray(cp.asarray(origins).astype(cp.int32, copy=False))
    if org.shape != (m, 2):
        raise ValueError(f"origins must have shape ({m}, 2); got {org.shape}")
    off = None
    if offset is not None:
        off = cp.ascontiguousarray(cp.asarray(offset, dtype=compute_dtype))
        if off.shape != (m, k, k):
            raise ValueError(f"offset must have shape ({m}, {k}, {k}); got {off.shape}")
    params = cp.empty((m, p), dtype=cp.float64)
    errors = cp.empty((m, p), dtype=cp.float64)
    cov = cp.empty((m, p, p), dtype=cp.float64)
    chi2 = cp.empty(m, dtype=cp.float64)
    n_iter = cp.empty(m, dtype=cp.int32)
    status = cp.empty(m, dtype=cp.int8)
    if m == 0:
        return LMOutput(params, errors, cov, chi2, n_iter, status)
    name = kernel_name(mdl.name, estimator, image_dtype, compute_dtype)
    kern = get_module(mdl.name, estimator, image_dtype, compute_dtype).get_function(name)
    f_n, h, w = stack.shape
    grid = ((m + BLOCK - 1) // BLOCK,)
    kern(grid, (BLOCK,), (
        stack, np.int32(f_n), np.int32(h), np.int32(w), fi, org, init, np.int64(m),
        np.int32(k), np.float64(gain), np.int32(max_iter), np.float64(tol),
        off if off is not None else np.uintp(0), params, errors, cov, chi2, n_iter, status))
    return LMOutput(params, errors, cov, chi2, n_iter, status)
