"""``cupy.RawModule`` / ``RawKernel`` of the stand-in: launches run the host build of
``kernels/`` (the same ``__host__ __device__`` math, compiled for the CPU with nvcc).

A launch is checked as the device would need it: each argument's C type from the kernel's
signature in ``kernels/lm_fit.cu`` (device arrays of the exact dtype, C-contiguous and of the
sizes the kernel indexes; scalars as NumPy scalars of the exact width, since CuPy passes a
Python ``int`` as 8 bytes), a grid that covers every fit, a block of at most 1024 threads.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np

from . import _api, _core

_EXPR = re.compile(r"^stemgpu::lm_fit_kernel<(float|double), (float|double), "
                   r"stemgpu::(\w+), ([01])>$")
_C = {"float": np.float32, "double": np.float64}


def host_library():
    """The ctypes host build of kernels/ (through one indirection: the builder may move)."""
    from host_build import build_host_library  # tests/ tooling (tests/ is on sys.path)

    return build_host_library()


def _model_ids():
    from stemgpu.atoms.models import MODELS

    # The host build lists the models in registry order (tests/host_build.py).
    return {m.cuda_struct.split("::")[1]: i for i, m in enumerate(MODELS.values())}


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)``."""

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=None):
        if (code is None) == (path is None):
            raise TypeError("Exactly one of code and path keyword arguments must be given.")
        if path is not None:
            raise NotImplementedError("stand-in: RawModule(path=) (cubin/ptx) is not modelled")
        if not isinstance(code, str):
            raise TypeError(f"code must be str; got {type(code)}")
        if not isinstance(options, tuple) or not all(isinstance(o, str) for o in options):
            raise TypeError("options must be a tuple of str (CuPy's RawModule signature)")
        if backend not in ("nvrtc", "nvcc"):
            raise ValueError(f"backend must be 'nvrtc' or 'nvcc'; got {backend!r}")
        from stemgpu.atoms.cuda import read_source

        if read_source() not in code:
            raise NotImplementedError("stand-in: only the code of kernels/lm_fit.cu can be "
                                      "launched (on its host build)")
        self.code = code
        self.options = options
        self.name_expressions = None if name_expressions is None else tuple(name_expressions)
        self._compiled = False

    def compile(self, log_stream=None):
        host_library()  # the host build stands for the NVRTC compile (same sources)
        self._compiled = True

    def get_function(self, name):
        if self.name_expressions is not None and name not in self.name_expressions:
            raise _api.CupyApiError(
                f"{name!r} was not given in name_expressions={self.name_expressions!r}; "
                "CuPy can only look up the specialisations it was asked to instantiate")
        m = _EXPR.match(name)
        if not m:
            raise NotImplementedError(f"stand-in: kernel {name!r} has no host entry point")
        self.compile()
        return RawKernel._specialisation(*m.groups())


class RawKernel:
    """One launchable ``lm_fit_kernel<TI, T, M, EST>`` specialisation."""

    def __init__(self, code, name, options=(), backend="nvrtc", *, translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):
        mod = RawModule(code=code, options=tuple(options), backend=backend)
        k = mod.get_function(name)
        self.__dict__.update(k.__dict__)

    @classmethod
    def _specialisation(cls, ti, t, model, est):
        k = object.__new__(cls)
        k.ti, k.t, k.est = _C[ti], _C[t], int(est)
        ids = _model_ids()
        if model not in ids:
            raise NotImplementedError(f"stand-in: model struct {model!r} unknown")
        k.model = ids[model]
        k.name = f"stemgpu::lm_fit_kernel<{ti}, {t}, stemgpu::{model}, {est}>"
        return k

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if np.prod(block) > 1024:
            raise ValueError(f"block {block} has more than 1024 threads")
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple; got {type(args).__name__}")
        a = _check_args(self, args)
        threads = int(np.prod(grid)) * int(np.prod(block))
        if threads < a["n_fits"]:
            raise ValueError(f"grid {grid} x block {block} = {threads} threads do not cover "
                             f"n_fits={a['n_fits']} (one thread per fit)")
        _core._bump("launches", "kernel launch", synchronizes=False)
        lib = host_library()
        rc = lib.stemgpu_host_lm_fit(
            self.model, self.est, int(self.ti == np.float64), int(self.t == np.float64),
            a["image"], a["n_frames"], a["height"], a["width"], a["frame_index"],
            a["origins"], a["init"], a["n_fits"], a["k"], a["gain"], a["max_iter"], a["tol"],
            a["offset"], a["params"], a["errors"], a["cov"], a["chi2"], a["n_iter"],
            a["status"])
        if rc != 0:
            raise RuntimeError(f"host build has no entry for {self.name}")


def _dims(v, what):
    v = (v,) if isinstance(v, int) else v
    if not isinstance(v, tuple) or not 1 <= len(v) <= 3 or not all(
            isinstance(x, int | np.integer) and x >= 1 for x in v):
        raise ValueError(f"{what} must be an int or a tuple of 1-3 positive ints; got {v!r}")
    return tuple(int(x) for x in v)


#: The kernel's parameter list (kernels/lm_fit.cu): name, C type.
SIGNATURE = (
    ("image", "TI*"), ("n_frames", "int"), ("height", "int"), ("width", "int"),
    ("frame_index", "int*"), ("origins", "int*"), ("init", "double*"), ("n_fits", "long long"),
    ("k", "int"), ("gain", "double"), ("max_iter", "int"), ("tol", "double"),
    ("offset", "T*?"), ("params", "double*"), ("errors", "double*"), ("cov", "double*"),
    ("chi2", "double*"), ("n_iter", "int*"), ("status", "signed char*"),
)
_SCALAR = {"int": np.int32, "long long": np.int64, "double": np.float64}
_POINTER = {"int*": np.int32, "double*": np.float64, "signed char*": np.int8}


def _check_args(kern, args):
    if len(args) != len(SIGNATURE):
        raise TypeError(f"{kern.name} takes {len(SIGNATURE)} arguments; got {len(args)}")
    out = {}
    arrays = {}
    for (name, ctype), v in zip(SIGNATURE, args, strict=True):
        if ctype in _SCALAR:
            want = _SCALAR[ctype]
            if type(v) is not want:
                raise TypeError(f"argument {name!r} ({ctype}) must be numpy.{want.__name__}; "
                                f"got {type(v).__name__} (CuPy passes a Python int as 8 bytes "
                                "and a float as a double)")
            out[name] = v.item()
            continue
        if ctype == "T*?" and type(v) is np.uintp and v == 0:
            out[name] = None  # a null pointer passed by value
            continue
        want = {"TI*": kern.ti, "T*?": kern.t}.get(ctype) or _POINTER[ctype]
        if isinstance(v, np.ndarray):
            raise TypeError(f"argument {name!r} is a numpy.ndarray: a kernel needs device "
                            "memory (CuPy raises TypeError for host arrays)")
        if not isinstance(v, _core.ndarray):
            raise TypeError(f"argument {name!r} ({ctype}) must be a cupy.ndarray; got "
                            f"{type(v).__name__}")
        if v.dtype != want:
            raise TypeError(f"argument {name!r} must be {np.dtype(want).name} for {kern.name}; "
                            f"got {v.dtype} (the kernel would reinterpret the bytes)")
        if not v._a.flags.c_contiguous:
            raise ValueError(f"argument {name!r} must be C-contiguous (the kernel indexes it "
                             "densely)")
        arrays[name] = v
        out[name] = v._a.ctypes.data_as(ctypes.c_void_p)
    n, f, h, w, k = out["n_fits"], out["n_frames"], out["height"], out["width"], out["k"]
    p = host_library().stemgpu_model_nparams(kern.model)
    sizes = {"image": f * h * w, "frame_index": n, "origins": 2 * n, "init": n * p,
             "params": n * p, "errors": n * p, "cov": n * p * p, "chi2": n, "n_iter": n,
             "status": n, "offset": n * k * k}
    for name, arr in arrays.items():
        if arr.size != sizes[name]:
            raise ValueError(f"argument {name!r} has {arr.size} elements; the kernel indexes "
                             f"{sizes[name]} (n_fits={n}, P={p}, k={k}, image {f}x{h}x{w})")
    fi = arrays["frame_index"]._a
    if n and (fi.min() < 0 or fi.max() >= f):
        raise ValueError(f"frame_index outside [0, {f}) would read outside the image")
    return out
