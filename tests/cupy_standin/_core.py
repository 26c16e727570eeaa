"""The stand-in's device array, ufuncs, functions and transfer counters.

A ``cupy.ndarray`` here wraps a NumPy array that plays the device buffer. Everything that
crosses the host/device line is explicit and counted; what CuPy refuses is refused with CuPy's
exception type (and, where CuPy has a fixed one, its message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import numpy as np

from . import _api

IMPLICIT_MESSAGE = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                    "to construct a NumPy array explicitly.")


class DeviceSynchronized(RuntimeError):
    """Raised (as ``cupyx.DeviceSynchronized``) by a synchronising operation inside
    ``cupyx.allow_synchronize(False)``."""


# --- counters -----------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    """Host/device traffic seen by the stand-in since the last reset.

    ``h2d``: host-to-device copies (``cupy.asarray``/``array`` of host data, ``ndarray.set``,
    host arrays written into or indexing device arrays); ``d2h``: device-to-host copies
    (``.get()``, ``cupy.asnumpy``, ``tolist``, ``item``, ``repr``/``str``/``format``);
    ``scalar``: synchronising scalar conversions (``float``/``int``/``bool``/``complex`` of a
    size-1 device array); ``launches``: ``RawKernel`` launches; ``synchronize``: explicit
    stream/device synchronisations.
    """

    h2d: int = 0
    d2h: int = 0
    scalar: int = 0
    launches: int = 0
    synchronize: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                         for f in dataclasses.fields(self)})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_COUNTS = Counts()
_state = threading.local()


def counts() -> Counts:
    """A snapshot of the counters."""
    return dataclasses.replace(_COUNTS)


def reset_counts() -> None:
    for f in dataclasses.fields(_COUNTS):
        setattr(_COUNTS, f.name, 0)


class _Delta:
    """What :func:`count_transfers` yields: the counts since the ``with`` began (live)."""

    def __init__(self):
        self._start = counts()

    def __getattr__(self, name):
        return getattr(counts() - self._start, name)

    def as_dict(self) -> dict:
        return (counts() - self._start).as_dict()

    def __repr__(self) -> str:
        return f"Counts({self.as_dict()})"


@contextlib.contextmanager
def count_transfers():
    """``with count_transfers() as c: ...; assert (c.h2d, c.d2h) == (1, 1)``."""
    yield _Delta()


def _bump(field: str, what: str, synchronizes: bool = True) -> None:
    if synchronizes and getattr(_state, "allow_sync", True) is False:
        raise DeviceSynchronized(f"{what} synchronizes the device inside "
                                 "cupyx.allow_synchronize(False)")
    setattr(_COUNTS, field, getattr(_COUNTS, field) + 1)


@contextlib.contextmanager
def allow_synchronize(allow):
    """``cupyx.allow_synchronize``: with ``False``, a synchronising call raises."""
    prev = getattr(_state, "allow_sync", True)
    _state.allow_sync = bool(allow)
    try:
        yield
    finally:
        _state.allow_sync = prev


# --- wrapping -----------------------------------------------------------------------------

def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if type(x) is tuple or type(x) is list:
        return type(x)(_unwrap(v) for v in x)
    if type(x) is dict:
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray._from_host_buffer(x)
    if isinstance(x, np.generic) and not isinstance(x, (np.str_, np.bytes_, np.void)):
        return ndarray._from_host_buffer(np.asarray(x))  # CuPy returns 0-d arrays
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)  # namedtuples (numpy 2's SVDResult...) too
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _host_arrays(x, depth=0):
    """NumPy arrays among a call's operands (lists/tuples searched two levels deep)."""
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (tuple, list)) and depth < 2:
        for v in x:
            yield from _host_arrays(v, depth + 1)
    elif isinstance(x, dict) and depth == 0:
        for v in x.values():
            yield from _host_arrays(v, depth + 1)


def refuse_host_operands(where: str, args, kwargs=None) -> None:
    for a in [*_host_arrays(tuple(args)), *_host_arrays(dict(kwargs or {}))]:
        raise TypeError(f"Unsupported type {type(a)} in {where}(): a numpy.ndarray (shape "
                        f"{a.shape}) is not a device operand; CuPy raises TypeError. Move it "
                        "with cupy.asarray() first (one counted host-to-device copy)")


# --- ufuncs -------------------------------------------------------------------------------

_SCALARS = (bool, int, float, complex, np.generic)


class ufunc:
    """``cupy.ufunc``: operands must be device arrays or scalars (not NumPy arrays, lists)."""

    def __init__(self, name: str, impl, params):
        self.__name__ = f"cupy_{name}"
        self._name = name
        self._impl = impl
        self._params = params
        self.nin = getattr(impl, "nin", 2)
        self.nout = getattr(impl, "nout", 1)

    def _check(self, where, operands):
        for x in operands:
            if x is None or isinstance(x, (ndarray, *_SCALARS)):
                continue
            raise TypeError(f"Unsupported type {type(x)} (operand of cupy.{where}; CuPy "
                            "ufuncs take only cupy.ndarray or scalars)")

    def __call__(self, *args, **kwargs):
        _api.check_call(f"cupy.{self._name}", self._params, args, kwargs)
        out = kwargs.get("out")
        self._check(self._name, args + (out if isinstance(out, tuple) else (out,)))
        return _wrap(self._impl(*_unwrap(args), **_unwrap(kwargs)))

    def _method(self, method, *args, **kwargs):
        self._check(f"{self._name}.{method}", args[:1] if method != "at" else args[:1])
        if method == "at":
            refuse_host_operands(f"cupy.{self._name}.at", args[1:])
        return _wrap(getattr(self._impl, method)(*_unwrap(args), **_unwrap(kwargs)))

    def reduce(self, *args, **kwargs):
        return self._method("reduce", *args, **kwargs)

    def accumulate(self, *args, **kwargs):
        return self._method("accumulate", *args, **kwargs)

    def outer(self, a, b, **kwargs):
        self._check(f"{self._name}.outer", (a, b))
        return _wrap(self._impl.outer(_unwrap(a), _unwrap(b), **_unwrap(kwargs)))

    def at(self, *args, **kwargs):
        return self._method("at", *args, **kwargs)

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


# --- the device array ---------------------------------------------------------------------

_BINARY = {  # operator -> ufunc
    "add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
    "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "and": "bitwise_and",
    "or": "bitwise_or", "xor": "bitwise_xor", "lshift": "left_shift", "rshift": "right_shift",
}
_COMPARE = {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
            "eq": "equal", "ne": "not_equal"}


def _cupy():
    import sys

    return sys.modules["cupy"] if "cupy" in sys.modules and getattr(
        sys.modules["cupy"], "__standin__", False) else _module_cupy()


@functools.cache
def _module_cupy():
    from ._modules import cupy_module

    return cupy_module()


def _size1(a: ndarray, what: str) -> None:
    if a._a.size != 1:
        raise TypeError("only length-1 arrays can be converted to Python scalars"
                        if what != "bool" else
                        "The truth value of an array with more than one element is ambiguous")


class ndarray:
    """``cupy.ndarray`` of the stand-in (a NumPy buffer playing device memory)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("stand-in: ndarray(memptr=, strides=) is not modelled")
        self._a = np.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _from_host_buffer(cls, a: np.ndarray) -> ndarray:
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # -- the host/device line --
    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT_MESSAGE)

    def get(self, stream=None, order="C", out=None, blocking=True):
        _bump("d2h", "ndarray.get()")
        if out is not None:
            if not isinstance(out, np.ndarray) or out.shape != self.shape:
                raise ValueError("Shape mismatch or out is not a numpy.ndarray")
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order if order != "K" else "C")

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray; got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape or dtype mismatch in ndarray.set()")
        _bump("h2d", "ndarray.set()", synchronizes=False)
        np.copyto(self._a, arr)

    def tolist(self):
        _bump("d2h", "ndarray.tolist()")
        return self._a.tolist()

    def item(self):
        _bump("d2h", "ndarray.item()")
        return self._a.item()

    def tobytes(self, order="C"):
        _bump("d2h", "ndarray.tobytes()")
        return self._a.tobytes(order)

    def _scalar(self, conv, what):
        _size1(self, what)
        _bump("scalar", f"{what}() of a cupy.ndarray")
        return conv(self._a.reshape(()).item())

    def __float__(self):
        return self._scalar(float, "float")

    def __int__(self):
        return self._scalar(int, "int")

    def __complex__(self):
        return self._scalar(complex, "complex")

    def __bool__(self):
        return self._scalar(bool, "bool")

    def __repr__(self):
        _bump("d2h", "repr() of a cupy.ndarray")
        return repr(self._a)

    def __str__(self):
        _bump("d2h", "str() of a cupy.ndarray")
        return str(self._a)

    def __format__(self, spec):
        _bump("d2h", "format() of a cupy.ndarray")
        return format(self._a.reshape(()).item() if self._a.ndim == 0 else self._a, spec)

    def __reduce__(self):
        return (ndarray._from_host_buffer, (self._a.copy(),))

    # -- plain attributes --
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(self._a.mT))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    base = property(lambda self: None if self._a.base is None else _wrap(self._a.base))

    @property
    def device(self):
        return _cupy().cuda.Device(0)

    @property
    def data(self):
        from ._cuda import MemoryPointer

        return MemoryPointer(self._a.ctypes.data)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "descr": self._a.dtype.descr,
                "data": (self._a.ctypes.data, False), "version": 3,
                "strides": None if self._a.flags.c_contiguous else self.strides}

    # -- container protocol --
    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def _index(self, key):
        key = key if isinstance(key, tuple) else (key,)
        for k in key:
            if isinstance(k, np.ndarray):  # CuPy copies host index arrays to the device
                _bump("h2d", "a NumPy index array", synchronizes=False)
        return tuple(_unwrap(k) for k in key)

    def __getitem__(self, key):
        return _wrap(self._a[self._index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            _bump("h2d", "a NumPy array assigned into a cupy.ndarray", synchronizes=False)
        self._a[self._index(key)] = _unwrap(value)

    # -- NumPy interoperability, as CuPy defines it --
    def __array_ufunc__(self, uf, method, *inputs, **kwargs):
        cp = _cupy()
        try:
            cu = getattr(cp, uf.__name__)
        except AttributeError:
            return NotImplemented
        if method == "__call__":
            return cu(*inputs, **kwargs)
        return getattr(cu, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        cp = _cupy()
        try:
            mod = functools.reduce(getattr, func.__module__.split(".")[1:], cp)
            cu = getattr(mod, func.__name__)
        except AttributeError:
            return NotImplemented
        if any(t not in (ndarray, np.ndarray) for t in types):
            return NotImplemented
        return cu(*args, **kwargs)

    # -- every other public method of cupy.ndarray: NumPy's, behind CuPy's signature --
    def __getattr__(self, name):
        entries = _api.class_entries("cupy.ndarray")
        entry = entries.get(name)
        if entry is None or name.startswith("__"):
            raise _api.CupyApiError(
                f"'cupy.ndarray' object has no attribute {name!r} (not in CuPy {_api.version()}"
                "; tests/cupy_standin/cupy_api.json)")
        target = getattr(self._a, name, None)
        if target is None:
            raise NotImplementedError(f"stand-in: cupy.ndarray.{name} has no NumPy model")
        if entry["kind"] == "attribute" or not callable(target):
            return _wrap(target)

        def method(*args, **kwargs):
            _api.check_call(f"cupy.ndarray.{name}", entry["params"], args, kwargs)
            refuse_host_operands(f"cupy.ndarray.{name}", args, kwargs)
            return _wrap(target(*_unwrap(args), **_unwrap(kwargs)))

        method.__name__ = name
        return method

    def __copy__(self):
        return _wrap(self._a.copy())

    def __deepcopy__(self, memo):
        return _wrap(self._a.copy())

    def __matmul__(self, other):
        return _cupy().matmul(self, other)

    def __rmatmul__(self, other):
        return _cupy().matmul(other, self)

    def __neg__(self):
        return _cupy().negative(self)

    def __pos__(self):
        return _cupy().positive(self)

    def __abs__(self):
        return _cupy().absolute(self)

    def __invert__(self):
        return _cupy().invert(self)


def _binary(uf_name):
    def op(self, other):
        return getattr(_cupy(), uf_name)(self, other)

    def rop(self, other):
        return getattr(_cupy(), uf_name)(other, self)

    def iop(self, other):
        getattr(_cupy(), uf_name)(self, other, out=self)
        return self

    return op, rop, iop


for _op, _uf in _BINARY.items():
    _f, _r, _i = _binary(_uf)
    setattr(ndarray, f"__{_op}__", _f)
    setattr(ndarray, f"__r{_op}__", _r)
    setattr(ndarray, f"__i{_op}__", _i)
for _op, _uf in _COMPARE.items():
    setattr(ndarray, f"__{_op}__", _binary(_uf)[0])
ndarray.__module__ = "cupy"  # what stemgpu.backend.is_cupy_array looks at
ndarray.__qualname__ = "ndarray"
