"""Tagged JSON: the exact, generic encoding of results-file values that are not arrays.

:func:`to_json` turns numbers, strings, ``None``, tuples, lists, sets, dicts with any keys,
slices, ranges, paths, NumPy scalars, small arrays, named tuples and dataclasses into JSON
values, tagging what JSON has no type for (``{"__tuple__": [...]}``, ``{"__ndarray__": dtype,
"shape": ..., "b64": ...}``, ...); :func:`from_json` is its exact inverse. Dataclasses and
named tuples are recorded by class path (``module:qualname``) and rebuilt without running
``__init__``; a class that has moved since a file was written is found through
:data:`MOVED_CLASSES`.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import warnings
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

from ..backend import is_cupy_array, to_host

__all__ = ["ARRAY_SUBCLASSES", "MOVED_CLASSES", "array_subclass", "as_subclass", "class_path",
           "dtype_from_json", "dtype_to_json", "dumps", "from_json", "import_class", "rebuild",
           "rebuild_namedtuple", "to_json"]

#: Class paths recorded by older files -> where the class lives now (old files keep loading
#: when a shim module at the old path is removed).
MOVED_CLASSES = {
    "stemgpu.pipeline:Analysis": "stemgpu.app.analysis:Analysis",
}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def dtype_to_json(dtype: np.dtype) -> Any:
    """A dtype as JSON: its ``str`` (``"<f4"``), or for structured and sub-array dtypes, whose
    ``str`` is only ``"|V8"``, NumPy's ``.npy`` description (field names, nesting, offsets)."""
    dtype = np.dtype(dtype)
    if dtype.fields is None and dtype.subdtype is None:
        return dtype.str
    out = {"descr": to_json(np.lib.format.dtype_to_descr(dtype), "dtype")}
    if dtype.isalignedstruct:
        out["align"] = True
    return out


def dtype_from_json(value: Any) -> np.dtype:
    """Inverse of :func:`dtype_to_json`."""
    if isinstance(value, dict):
        dtype = np.lib.format.descr_to_dtype(from_json(value["descr"]))
        return np.dtype(dtype, align=True) if value.get("align") else dtype
    return np.dtype(value)


#: ndarray subclasses a results file keeps (rebuilt as views on load); a memmap is stored as
#: the plain array it is, and masked arrays are stored with their mask.
ARRAY_SUBCLASSES = {"recarray": np.recarray, "matrix": np.matrix}


def array_subclass(arr: Any, where: str) -> str | None:
    """The :data:`ARRAY_SUBCLASSES` name of an ndarray subclass (None for a plain ndarray or
    a memmap); ``TypeError`` naming ``where`` for any other subclass (it would come back as a
    plain ndarray, losing whatever the subclass holds)."""
    cls = type(arr)
    if not isinstance(arr, np.ndarray) or cls is np.ndarray or cls is np.memmap:
        return None
    for name, sub in ARRAY_SUBCLASSES.items():
        if cls is sub:
            return name
    raise TypeError(
        f"cannot save {where}: ndarray subclass {cls.__module__}.{cls.__qualname__} is not "
        "supported (accepted: ndarray, numpy.ma.MaskedArray, recarray, matrix, memmap); pass "
        "numpy.asarray(value) to store its data")


def as_subclass(arr: np.ndarray, name: str | None) -> np.ndarray:
    """``arr`` viewed as the subclass recorded by :func:`array_subclass`."""
    return arr if name is None else arr.view(ARRAY_SUBCLASSES[name])


def to_json(obj: Any, where: str) -> Any:
    """Tagged JSON-able form of ``obj`` (inverse: :func:`from_json`)."""
    if isinstance(obj, np.str_):  # a str subclass: keep the NumPy type
        # The array's dtype, not the scalar's: an empty np.str_ is '<U0' but stores 4 bytes.
        arr = np.asarray(obj)
        return {"__npscalar__": arr.dtype.str, "b64": _b64(arr.tobytes())}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj  # json writes repr(): exact; NaN/Infinity tokens are read back by Python
    if isinstance(obj, complex):
        return {"__complex__": [obj.real, obj.imag]}
    if isinstance(obj, np.generic):
        if obj.dtype.kind in "biuf":
            return {"__npscalar__": obj.dtype.str, "value": obj.item()}
        arr = np.asarray(obj)  # an empty np.bytes_ is 'S0' as a scalar, 'S1' as an array
        return {"__npscalar__": dtype_to_json(arr.dtype), "b64": _b64(arr.tobytes())}
    if isinstance(obj, np.ma.MaskedArray):
        return {"__masked__": to_json(np.ma.getdata(obj), where),
                "mask": to_json(np.ma.getmaskarray(obj), where),
                "fill_value": to_json(obj.fill_value, where),
                "hard_mask": bool(obj.hardmask)}
    if isinstance(obj, np.ndarray) or is_cupy_array(obj):
        sub = array_subclass(obj, where)
        arr = np.asarray(to_host(obj))  # 0-d stays 0-d (ascontiguousarray would make it 1-d)
        if arr.dtype.hasobject:
            out = {"__objarray__": [to_json(v, f"{where}[...]") for v in arr.ravel()],
                   "shape": list(arr.shape)}
        else:  # tobytes() is C order whatever the layout
            out = {"__ndarray__": dtype_to_json(arr.dtype), "shape": list(arr.shape),
                   "b64": _b64(arr.tobytes())}
        if sub is not None:
            out["subclass"] = sub
        return out
    if isinstance(obj, bytes):
        return {"__bytes__": _b64(obj)}
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # NamedTuple, e.g. XY
        return {"__namedtuple__": class_path(type(obj)),
                "values": [to_json(v, f"{where}.{f}") for f, v in zip(obj._fields, obj,
                                                                         strict=True)]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset):
        tag = "__set__" if isinstance(obj, set) else "__frozenset__"
        items = [to_json(v, f"{where}{{...}}") for v in obj]
        return {tag: sorted(items, key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(obj, slice):
        return {"__slice__": [to_json(obj.start, where), to_json(obj.stop, where),
                              to_json(obj.step, where)]}
    if isinstance(obj, range):
        return {"__range__": [obj.start, obj.stop, obj.step]}
    if isinstance(obj, PurePath):
        return {"__path__": str(obj), "type": type(obj).__name__}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__dict__": [[to_json(k, where), to_json(v, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": class_path(type(obj)),
                "fields": {f.name: to_json(getattr(obj, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    raise TypeError(
        f"cannot save {where}: objects of type {type(obj).__module__}.{type(obj).__qualname__}"
        " are not supported (accepted: arrays, numbers, strings, None, dicts, lists, tuples, "
        "slices, paths, dataclasses, sidpy Datasets)")


def from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(from_json(v) for v in obj["__tuple__"])
    if "__namedtuple__" in obj:
        return rebuild_namedtuple(obj["__namedtuple__"], [from_json(v) for v in obj["values"]])
    if "__complex__" in obj:
        return complex(*obj["__complex__"])
    if "__npscalar__" in obj:
        dtype = dtype_from_json(obj["__npscalar__"])
        if "b64" in obj:
            if dtype.itemsize == 0:  # files written before the fix above: an empty value
                return dtype.type()
            return np.frombuffer(base64.b64decode(obj["b64"]), dtype=dtype)[0]
        return dtype.type(obj["value"])
    if "__masked__" in obj:
        return np.ma.masked_array(from_json(obj["__masked__"]), mask=from_json(obj["mask"]),
                                  fill_value=from_json(obj["fill_value"]),
                                  hard_mask=obj.get("hard_mask", False))
    if "__ndarray__" in obj:
        # a writable buffer, not .copy(): a copy drops the padding bytes of aligned records
        arr = np.frombuffer(bytearray(base64.b64decode(obj["b64"])),
                            dtype=dtype_from_json(obj["__ndarray__"]))
        return as_subclass(arr.reshape(obj["shape"]), obj.get("subclass"))
    if "__objarray__" in obj:
        out = np.empty(len(obj["__objarray__"]), dtype=object)
        out[:] = [from_json(v) for v in obj["__objarray__"]]
        return as_subclass(out.reshape(obj["shape"]), obj.get("subclass"))
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__set__" in obj:
        return {from_json(v) for v in obj["__set__"]}
    if "__frozenset__" in obj:
        return frozenset(from_json(v) for v in obj["__frozenset__"])
    if "__slice__" in obj:
        return slice(*(from_json(v) for v in obj["__slice__"]))
    if "__range__" in obj:
        return range(*obj["__range__"])
    if "__path__" in obj:
        import pathlib

        return getattr(pathlib, obj.get("type", "Path"), pathlib.Path)(obj["__path__"])
    if "__dict__" in obj:
        return {from_json(k): from_json(v) for k, v in obj["__dict__"]}
    if "__dataclass__" in obj:
        fields = {k: from_json(v) for k, v in obj["fields"].items()}
        return rebuild(obj["__dataclass__"], fields)
    return {k: from_json(v) for k, v in obj.items()}


def dumps(obj: Any, where: str) -> str:
    """:func:`to_json` of ``obj`` as a JSON string (``where`` names it in errors)."""
    return json.dumps(to_json(obj, where), allow_nan=True)


# ---------------------------------------------------------------------------- classes


def class_path(cls: type) -> str:
    """``module:qualname`` of ``cls``, as files record it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str):
    """The class at ``module:qualname`` (an old path is looked up in :data:`MOVED_CLASSES`).

    Examples
    --------
    >>> from stemgpu.io._codec import import_class
    >>> import_class("stemgpu.pipeline:Analysis").__module__
    'stemgpu.app.analysis'
    """
    module, _, qualname = MOVED_CLASSES.get(path, path).partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def rebuild(path: str, fields: dict) -> Any:
    """Recreate a dataclass instance exactly, without re-running ``__init__``/validation."""
    try:
        cls = import_class(path)
    except (ImportError, AttributeError) as exc:
        warnings.warn(f"cannot import {path} ({exc}); returning its fields as a dict",
                      stacklevel=3)
        return {"__class__": path, **fields}
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def rebuild_namedtuple(path: str, values: list) -> Any:
    try:
        return import_class(path)(*values)
    except (ImportError, AttributeError, TypeError) as exc:
        warnings.warn(f"cannot rebuild {path} ({exc}); returning a tuple", stacklevel=3)
        return tuple(values)
