"""The strict module objects: ``cupy``, its submodules and ``cupyx``.

Each module answers only the names the checked-in CuPy API list has; a function is the
NumPy/SciPy function of the same name behind CuPy's signature (keyword names checked) and the
device-operand rule (NumPy arrays refused).
"""

from __future__ import annotations

import functools
import importlib
import types

import numpy as np

from . import _api, _core

#: Stand-in module -> the host library whose same-named functions model it.
_HOST = {
    "cupy": "numpy", "cupy.linalg": "numpy.linalg", "cupy.fft": "numpy.fft",
    "cupy.random": "numpy.random", "cupyx.scipy.fft": "scipy.fft",
    "cupyx.scipy.ndimage": "scipy.ndimage", "cupyx.scipy.linalg": "scipy.linalg",
    "cupyx.scipy.special": "scipy.special", "cupyx.scipy.signal": "scipy.signal",
}
#: Functions that take host data or return host values (no operand check, no wrapping).
_HOST_OK = {
    "isscalar", "ndim", "shape", "size", "result_type", "can_cast", "dtype", "finfo", "iinfo",
    "issubdtype", "min_scalar_type", "promote_types", "common_type", "broadcast_shapes",
    "iscomplexobj", "isrealobj", "binary_repr", "base_repr", "typename", "mintypecode",
    "get_default_memory_pool", "get_default_pinned_memory_pool", "show_config",
    "is_available", "fftfreq", "rfftfreq",
}
#: Classes CuPy takes from NumPy (dtype information, not arrays).
_HOST_CLASSES = {"finfo", "iinfo", "dtype", "errstate"}
#: Functions whose NumPy model returns a Python bool where CuPy returns a 0-d array.
_BOOL_ARRAY = {"allclose", "array_equal", "array_equiv"}


class StrictModule(types.ModuleType):
    """A module that has exactly the public names of its CuPy counterpart."""

    __standin__ = True

    def __init__(self, name: str, overrides: dict | None = None):
        super().__init__(name)
        self.__dict__["_overrides"] = dict(overrides or {})
        self.__dict__["__doc__"] = f"Strict CuPy stand-in for {name} (CuPy {_api.version()})."

    def __dir__(self):
        return sorted(set(_api.module_entries(self.__name__)) | set(self._overrides))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        entries = _api.module_entries(self.__name__)
        if name in self._overrides:
            value = self._overrides[name]
        elif name not in entries:
            raise _api.CupyApiError(
                f"module {self.__name__!r} has no attribute {name!r} (not in CuPy "
                f"{_api.version()}; tests/cupy_standin/cupy_api.json)")
        else:
            value = _build(self.__name__, name, entries[name])
        self.__dict__[name] = value
        return value


def _host_attr(module: str, name: str):
    host = _HOST.get(module)
    if host is None:
        return None
    return getattr(importlib.import_module(host), name, None)


def device_function(qualname: str, impl, params, host_ok: bool = False, bool_array=False):
    @functools.wraps(impl)
    def f(*args, **kwargs):
        _api.check_call(qualname, params, args, kwargs)
        if host_ok:
            return impl(*_core._unwrap(args), **_core._unwrap(kwargs))
        _core.refuse_host_operands(qualname, args, kwargs)
        out = impl(*_core._unwrap(args), **_core._unwrap(kwargs))
        if bool_array and isinstance(out, bool):
            out = np.asarray(out)
        return _core._wrap(out)

    f.__module__ = qualname.rpartition(".")[0]
    f.__qualname__ = f.__name__ = qualname.rpartition(".")[2]
    return f


def _missing(qualname):
    def f(*args, **kwargs):
        raise NotImplementedError(f"stand-in: {qualname} exists in CuPy {_api.version()} but "
                                  "has no NumPy/SciPy model here; add one in "
                                  "tests/cupy_standin/_modules.py")

    return f


def _build(module: str, name: str, entry: dict):
    qual = f"{module}.{name}"
    kind = entry["kind"]
    host = _host_attr(module, name)
    if kind == "module":
        return submodule(entry["name"])
    if kind in ("numpy", "constant"):
        return host if host is not None else getattr(np, name)
    if kind == "ufunc":
        return _core.ufunc(name, host, entry.get("params")) if host is not None else _missing(qual)
    if kind == "function" and host is not None and callable(host):
        return device_function(qual, host, entry.get("params"), host_ok=name in _HOST_OK,
                               bool_array=name in _BOOL_ARRAY)
    if kind == "class" and isinstance(host, type) and (
            issubclass(host, Warning | Exception | np.generic) or name in _HOST_CLASSES):
        return host
    if host is not None and not callable(host):
        return host
    return _missing(qual)


@functools.cache
def submodule(name: str) -> StrictModule:
    if name.startswith("cupy.cuda"):
        from . import _cuda

        return _cuda.module(name)
    return StrictModule(name, _OVERRIDES.get(name, {}))


# --- overrides: the host/device line and what has no NumPy twin ---------------------------

def _from_host(a, dtype, order, copy):
    if isinstance(a, _core.ndarray):
        arr = a._a if dtype is None else a._a.astype(dtype, copy=False)
        if order in ("C", "F"):
            arr = np.asarray(arr, order=order)
        if copy and arr is a._a:
            arr = arr.copy()
        return _core._wrap(arr)
    unwrapped = _core._unwrap(a)
    nested = any(True for _ in _device_inside(a))
    if not nested:
        _core._bump("h2d", "cupy.asarray() of host data", synchronizes=False)
    arr = np.array(unwrapped, dtype=dtype, order=order or "K", copy=True)
    return _core._wrap(arr)


def _device_inside(x, depth=0):
    if isinstance(x, _core.ndarray):
        yield x
    elif isinstance(x, (list, tuple)) and depth < 3:
        for v in x:
            yield from _device_inside(v, depth + 1)


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    return _from_host(a, dtype, order, copy=bool(copy))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    out = _from_host(obj, dtype, order, copy=copy is not False)
    while out.ndim < ndmin:
        out = out[None]
    return out


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, _core.ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    arr = np.asarray(a, order=order)
    if out is not None:
        out[...] = arr
        return out
    return arr


def get_array_module(*args):
    return submodule("cupy") if any(isinstance(a, _core.ndarray) for a in args) else np


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, _core.ndarray):  # CuPy's core routine is typed on its ndarray
        raise TypeError("Argument 'a' has incorrect type (expected cupy._core.core."
                        f"_ndarray_base, got {type(a).__name__})")
    return _core._wrap(np.ascontiguousarray(a._a, dtype=dtype))


def _raw(name):
    def get(*args, **kwargs):
        from . import _raw as raw

        return getattr(raw, name)(*args, **kwargs)

    return get


def _checked(qualname, fn):
    """An override behind CuPy's recorded signature."""
    module, _, name = qualname.rpartition(".")
    params = _api.module_entries(module)[name].get("params")

    @functools.wraps(fn)
    def f(*args, **kwargs):
        _api.check_call(qualname, params, args, kwargs)
        return fn(*args, **kwargs)

    return f


def _cupyx_overrides():
    return {
        "allow_synchronize": _core.allow_synchronize,
        "DeviceSynchronized": _core.DeviceSynchronized,
        "scipy": submodule("cupyx.scipy"),
    }


_OVERRIDES = {
    "cupy": {
        "ndarray": _core.ndarray, "ufunc": _core.ufunc,
        "asarray": _checked("cupy.asarray", asarray),
        "array": _checked("cupy.array", array),
        "asanyarray": _checked("cupy.asanyarray", asarray),
        "asnumpy": _checked("cupy.asnumpy", asnumpy),
        "get_array_module": get_array_module,
        "ascontiguousarray": _checked("cupy.ascontiguousarray", ascontiguousarray),
        "RawModule": _raw("RawModule"), "RawKernel": _raw("RawKernel"),
        "__version__": None,
    },
}


def cupy_module() -> StrictModule:
    mod = submodule("cupy")
    mod.__dict__["__version__"] = _api.version()
    return mod


def cupyx_module() -> StrictModule:
    mod = StrictModule("cupyx")
    mod._overrides.update(_cupyx_overrides())
    return mod
