"""Save and load stemgpu results: one HDF5 file in pyNSID layout, written atomically.

Layout of a results file::

    /                         attrs: stemgpu_format="stemgpu-results", format version
    /Measurement_000/Channel_NNN/<name>/<name>
                              image-like results (registered stacks, mean images, sidpy
                              Datasets) written by pyNSID as sidpy datasets, calibrated in nm
    /stemgpu/provenance       JSON: stemgpu version, backend, device, every result's
                              parameters, input file path and SHA-256, versions, time
    /stemgpu/root             the saved object, serialised generically (below)

Generic serialisation (exact round trip, dtypes included): a frozen dataclass becomes a group
recording its class path; array fields become datasets (never attributes: pyNSID silently
drops attributes over 64 KB, so a large atom table would vanish), scalar fields become
attributes, nested dataclasses become subgroups, dicts/lists/tuples without large arrays
become one JSON dataset (any size) in a tagged encoding that keeps tuples, slices, non-string
keys, NumPy scalars and small arrays exact; ``None`` fields are recorded as such. Image-like
arrays written by pyNSID are hard-linked into the tree, so they are stored once.

Writing goes to a hidden temporary file in the target directory which is fsync'ed and then
renamed over the target (``os.replace``): a failed or killed write never leaves a partial
results file. A temporary file left by a killed process is removed by the next ``save`` into
the same directory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import os
import platform
import re
import secrets
import socket
import sys
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import numpy as np

from .._inputs import is_sidpy_dataset
from ..backend import is_cupy_array, to_host

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "read_provenance", "save"]

FORMAT = "stemgpu-results"
FORMAT_VERSION = 1
#: dataclass fields written as pyNSID sidpy datasets (and the dimensionality they need)
IMAGE_FIELDS = {"registered": 3, "warped": 3, "mean": 2, "mean_image": 2, "image": 2}
#: containers holding a larger array than this are written as groups, not JSON
_JSON_ARRAY_LIMIT = 4096
_LONG_STRING = 8192
_TMP_SUFFIX = ".stemgpu-tmp"
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]

# Test hook: called with the open h5py file after the content is written, before it is
# closed and renamed (tests raise or block here to simulate a crash mid-write).
_before_commit = None


# ============================================================================ JSON encoding


def _is_lazy_array(obj: Any) -> bool:
    return (not isinstance(obj, np.ndarray) and not is_cupy_array(obj)
            and all(hasattr(obj, a) for a in ("shape", "dtype", "__getitem__"))
            and not isinstance(obj, str | bytes | Mapping | list | tuple | np.generic)
            and not is_sidpy_dataset(obj))


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or is_cupy_array(obj) or _is_lazy_array(obj)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _to_json(obj: Any, where: str) -> Any:
    """Tagged JSON-able form of ``obj`` (inverse: :func:`_from_json`)."""
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
        return {"__npscalar__": obj.dtype.str, "b64": _b64(np.asarray(obj).tobytes())}
    if isinstance(obj, np.ndarray) or is_cupy_array(obj):
        arr = np.ascontiguousarray(to_host(obj))
        if arr.dtype.hasobject:
            return {"__objarray__": [_to_json(v, f"{where}[...]") for v in arr.ravel()],
                    "shape": list(arr.shape)}
        return {"__ndarray__": arr.dtype.str, "shape": list(arr.shape), "b64": _b64(arr.tobytes())}
    if isinstance(obj, bytes):
        return {"__bytes__": _b64(obj)}
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # NamedTuple, e.g. XY
        return {"__namedtuple__": _class_path(type(obj)),
                "values": [_to_json(v, f"{where}.{f}") for f, v in zip(obj._fields, obj,
                                                                         strict=True)]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset):
        tag = "__set__" if isinstance(obj, set) else "__frozenset__"
        items = [_to_json(v, f"{where}{{...}}") for v in obj]
        return {tag: sorted(items, key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(obj, slice):
        return {"__slice__": [_to_json(obj.start, where), _to_json(obj.stop, where),
                              _to_json(obj.step, where)]}
    if isinstance(obj, range):
        return {"__range__": [obj.start, obj.stop, obj.step]}
    if isinstance(obj, PurePath):
        return {"__path__": str(obj), "type": type(obj).__name__}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _to_json(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__dict__": [[_to_json(k, where), _to_json(v, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": _class_path(type(obj)),
                "fields": {f.name: _to_json(getattr(obj, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    raise TypeError(
        f"cannot save {where}: objects of type {type(obj).__module__}.{type(obj).__qualname__}"
        " are not supported (accepted: arrays, numbers, strings, None, dicts, lists, tuples, "
        "slices, paths, dataclasses, sidpy Datasets)")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(_from_json(v) for v in obj["__tuple__"])
    if "__namedtuple__" in obj:
        return _rebuild_namedtuple(obj["__namedtuple__"], [_from_json(v) for v in obj["values"]])
    if "__complex__" in obj:
        return complex(*obj["__complex__"])
    if "__npscalar__" in obj:
        dtype = np.dtype(obj["__npscalar__"])
        if "b64" in obj:
            return np.frombuffer(base64.b64decode(obj["b64"]), dtype=dtype)[0]
        return dtype.type(obj["value"])
    if "__ndarray__" in obj:
        arr = np.frombuffer(base64.b64decode(obj["b64"]), dtype=np.dtype(obj["__ndarray__"]))
        return arr.reshape(obj["shape"]).copy()
    if "__objarray__" in obj:
        out = np.empty(len(obj["__objarray__"]), dtype=object)
        out[:] = [_from_json(v) for v in obj["__objarray__"]]
        return out.reshape(obj["shape"])
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__set__" in obj:
        return {_from_json(v) for v in obj["__set__"]}
    if "__frozenset__" in obj:
        return frozenset(_from_json(v) for v in obj["__frozenset__"])
    if "__slice__" in obj:
        return slice(*(_from_json(v) for v in obj["__slice__"]))
    if "__range__" in obj:
        return range(*obj["__range__"])
    if "__path__" in obj:
        import pathlib

        return getattr(pathlib, obj.get("type", "Path"), pathlib.Path)(obj["__path__"])
    if "__dict__" in obj:
        return {_from_json(k): _from_json(v) for k, v in obj["__dict__"]}
    if "__dataclass__" in obj:
        fields = {k: _from_json(v) for k, v in obj["fields"].items()}
        return _rebuild(obj["__dataclass__"], fields)
    return {k: _from_json(v) for k, v in obj.items()}


def _dumps(obj: Any, where: str) -> str:
    return json.dumps(_to_json(obj, where), allow_nan=True)


# ============================================================================ classes


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str):
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rebuild(class_path: str, fields: dict) -> Any:
    """Recreate a dataclass instance exactly, without re-running ``__init__``/validation."""
    try:
        cls = _import_class(class_path)
    except (ImportError, AttributeError) as exc:
        warnings.warn(f"cannot import {class_path} ({exc}); returning its fields as a dict",
                      stacklevel=3)
        return {"__class__": class_path, **fields}
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def _rebuild_namedtuple(class_path: str, values: list) -> Any:
    try:
        return _import_class(class_path)(*values)
    except (ImportError, AttributeError, TypeError) as exc:
        warnings.warn(f"cannot rebuild {class_path} ({exc}); returning a tuple", stacklevel=3)
        return tuple(values)


# ============================================================================ writing


def _needs_group(obj: Any) -> bool:
    """Containers that hold dataclasses, sidpy Datasets or large arrays become groups."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return True
    if is_sidpy_dataset(obj) or _is_lazy_array(obj):
        return True
    if isinstance(obj, np.ndarray) or is_cupy_array(obj):
        return obj.nbytes > _JSON_ARRAY_LIMIT and not obj.dtype.hasobject
    if isinstance(obj, Mapping):
        return any(_needs_group(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_needs_group(v) for v in obj)
    return False


def _h5_name(key: Any, index: int, used: set) -> str:
    if (isinstance(key, str) and key and "/" not in key and key not in (".", "..")
            and not key.startswith("stemgpu_") and key not in used):
        return key
    name = f"item_{index}"
    while name in used:
        name += "_"
    return name


class _Writer:
    def __init__(self, fh, compression, progress):
        self.fh = fh
        self.compression = compression
        self.progress = progress
        self.channels = 0
        self.parameters: dict[str, Any] = {}
        self.backends: set[str] = set()

    # -------------------------------------------------------------- arrays
    def array(self, group, name: str, value: Any, where: str) -> dict:
        if is_cupy_array(value):
            self.backends.add("cupy")
        if _is_lazy_array(value):
            return self._lazy_array(group, name, value)
        arr = to_host(value)
        if arr.dtype.hasobject:
            group.create_dataset(name, data=_dumps(arr, where))
            return {"tag": "json"}
        if arr.dtype.kind == "U":  # HDF5 has no UCS-4 strings: store the code points
            group.create_dataset(name, data=arr.view(np.uint32).reshape(
                (*arr.shape, arr.dtype.itemsize // 4)) if arr.size else
                np.zeros((*arr.shape, 0), np.uint32))
            return {"tag": "array", "dtype": arr.dtype.str, "shape": list(arr.shape)}
        kwargs = {}
        if self.compression and arr.size > 1:
            kwargs = {"compression": self.compression, "chunks": True}
        order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous \
            else "C"
        group.create_dataset(name, data=arr, **kwargs)
        entry = {"tag": "array"}
        if order == "F":
            entry["order"] = "F"
        return entry

    def _lazy_array(self, group, name, value) -> dict:
        shape = tuple(int(s) for s in value.shape)
        dtype = np.dtype(value.dtype)
        kwargs = {"compression": self.compression} if self.compression else {}
        dset = group.create_dataset(name, shape=shape, dtype=dtype,
                                    chunks=(1, *shape[1:]) if len(shape) >= 2 else None,
                                    **kwargs)
        self._copy_frames(value, dset)
        return {"tag": "array"}

    def _copy_frames(self, src, dset) -> None:
        n = dset.shape[0] if dset.ndim else 0
        if dset.ndim == 0:
            dset[()] = np.asarray(src[()])
            return
        frame_bytes = max(1, int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize)
        batch = max(1, (64 << 20) // frame_bytes)  # ~64 MB per read
        starts = range(0, n, batch)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="save", unit="batch")
        for start in starts:
            dset[start:start + batch] = to_host(src[start:start + batch])

    # -------------------------------------------------------------- sidpy / pyNSID
    def nsid(self, dataset, title: str):
        """Write a sidpy Dataset with pyNSID under /Measurement_000/Channel_NNN."""
        import pyNSID

        group = self.fh.require_group("Measurement_000").create_group(
            f"Channel_{self.channels:03d}")
        self.channels += 1
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in title) or "data"
        # pyNSID writes dict metadata as attributes and drops large ones: give it a small
        # copy here; the complete metadata is stored as JSON datasets by the caller.
        full_meta = (dict(getattr(dataset, "metadata", {}) or {}),
                     dict(getattr(dataset, "original_metadata", {}) or {}))
        dataset.metadata, dataset.original_metadata = {}, {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pyNSID's own FutureWarnings
                main = pyNSID.hdf_io.write_nsid_dataset(dataset, group, main_data_name=safe)
        finally:
            dataset.metadata, dataset.original_metadata = full_meta
        return main

    def image_field(self, group, name, value, owner, where) -> dict:
        from .sidpy_io import to_dataset

        px = getattr(owner, "pixel_size_pm", None)
        px = float(px) if isinstance(px, int | float | np.floating) and px and px > 0 else None
        if is_cupy_array(value):
            self.backends.add("cupy")
            value = value.get()
        # "result['rigid'].registered" -> "rigid_registered"
        title = re.sub(r"[^0-9A-Za-z]+", "_", where.removeprefix("result")).strip("_") or name
        ds = to_dataset(value, pixel_size=px, title=title,
                        metadata={"stemgpu_result_path": where})
        main = self.nsid(ds, title)
        group[name] = main  # hard link: one copy of the data, two names
        return {"tag": "array", "nsid": main.name}

    def sidpy(self, group, name, dataset, where) -> dict:
        main = self.nsid(dataset, str(getattr(dataset, "title", "") or name))
        sub = group.create_group(name)
        sub["data"] = main
        sub.create_dataset("metadata", data=_dumps(dict(dataset.metadata or {}), where))
        sub.create_dataset("original_metadata",
                           data=_dumps(dict(dataset.original_metadata or {}), where))
        axes = []
        for i in range(dataset.ndim):
            ax = dataset._axes[i]
            axes.append({"name": ax.name, "units": ax.units, "quantity": ax.quantity,
                         "dimension_type": ax.dimension_type.name,
                         "values": np.asarray(ax.values)})
        info = {"title": dataset.title, "units": dataset.units, "quantity": dataset.quantity,
                "data_type": dataset.data_type.name, "modality": dataset.modality,
                "source": dataset.source, "axes": axes}
        sub.create_dataset("info", data=_dumps(info, where))
        sub.attrs["stemgpu_kind"] = "sidpy"
        return {"tag": "group", "nsid": main.name}

    # -------------------------------------------------------------- generic tree
    def value(self, group, name: str, value: Any, where: str, owner: Any = None) -> dict:
        if value is None:
            return {"tag": "none"}
        if is_sidpy_dataset(value):
            return self.sidpy(group, name, value, where)
        if _is_array(value):
            ndim = len(value.shape)
            real = np.dtype(value.dtype).kind in "iuf"
            if owner is not None and IMAGE_FIELDS.get(name) == ndim and real:
                return self.image_field(group, name, value, owner, where)
            return self.array(group, name, value, where)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            self.dataclass(group.create_group(name), value, where)
            return {"tag": "group"}
        if isinstance(value, Mapping | list | tuple) and _needs_group(value):
            self.container(group.create_group(name), value, where)
            return {"tag": "group"}
        scalar = self.scalar(group, name, value)
        if scalar is not None:
            return scalar
        group.create_dataset(name, data=_dumps(value, where))
        return {"tag": "json"}

    @staticmethod
    def scalar(group, name: str, value: Any) -> dict | None:
        """Store numbers and short strings as native attributes; None if not a scalar."""
        if isinstance(value, bool):
            group.attrs[name] = np.bool_(value)
            return {"tag": "scalar", "type": "bool"}
        if isinstance(value, int):
            if -(2**63) <= value < 2**63:
                group.attrs[name] = np.int64(value)
                return {"tag": "scalar", "type": "int"}
            return None
        if isinstance(value, float):
            group.attrs[name] = np.float64(value)
            return {"tag": "scalar", "type": "float"}
        if isinstance(value, complex):
            group.attrs[name] = np.complex128(value)
            return {"tag": "scalar", "type": "complex"}
        if isinstance(value, str) and len(value) <= _LONG_STRING:
            group.attrs[name] = value
            return {"tag": "scalar", "type": "str"}
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":
            group.attrs[name] = value
            return {"tag": "scalar", "type": "numpy", "dtype": value.dtype.str}
        return None

    def dataclass(self, group, obj: Any, where: str) -> None:
        group.attrs["stemgpu_kind"] = "dataclass"
        group.attrs["stemgpu_class"] = _class_path(type(obj))
        params = getattr(obj, "parameters", None)
        if isinstance(params, Mapping):
            self.parameters[where] = params
            if isinstance(params.get("backend"), str):
                self.backends.add(params["backend"])
        members = []
        for f in dataclasses.fields(obj):
            entry = self.value(group, f.name, getattr(obj, f.name), f"{where}.{f.name}", obj)
            members.append({"key": f.name, "name": f.name, **entry})
        group.attrs["stemgpu_members"] = json.dumps(members)

    def container(self, group, obj: Any, where: str) -> None:
        if isinstance(obj, Mapping):
            kind, items = "dict", list(obj.items())
        else:
            kind = "tuple" if isinstance(obj, tuple) else "list"
            items = list(enumerate(obj))
            if kind == "tuple" and hasattr(type(obj), "_fields"):
                kind = "namedtuple"
                group.attrs["stemgpu_class"] = _class_path(type(obj))
        group.attrs["stemgpu_kind"] = kind
        used: set[str] = set()
        members = []
        for i, (key, val) in enumerate(items):
            name = _h5_name(key, i, used) if kind == "dict" else f"item_{i}"
            used.add(name)
            sub_where = f"{where}[{key!r}]"
            entry = self.value(group, name, val, sub_where, None)
            members.append({"key": _to_json(key, where), "name": name, **entry})
        group.attrs["stemgpu_members"] = json.dumps(members)


# ============================================================================ reading


def _read_member(group, entry: dict, lazy: bool) -> Any:
    import h5py

    tag, name = entry["tag"], entry["name"]
    if tag == "none":
        return None
    if tag == "scalar":
        raw = group.attrs[name]
        kind = entry["type"]
        if kind == "bool":
            return bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "complex":
            return complex(raw)
        if kind == "str":
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        return np.dtype(entry["dtype"]).type(raw)
    if tag == "json":
        return _from_json(json.loads(group[name].asstr()[()]))
    if tag == "array":
        dset = group[name]
        if "dtype" in entry:  # unicode array stored as code points
            raw = dset[()]
            return np.ascontiguousarray(raw).view(np.dtype(entry["dtype"])).reshape(
                entry["shape"])
        if lazy and dset.ndim == 3:
            from .lazy import LazyStack

            return LazyStack.from_hdf5(dset.file.filename, dset.name)
        arr = dset[()]
        if isinstance(arr, bytes):  # 0-d string arrays come back as bytes
            arr = np.array(arr)
        if entry.get("order") == "F":
            arr = np.asfortranarray(arr)
        return arr
    if tag == "group":
        sub = group[name]
        if not isinstance(sub, h5py.Group):
            raise ValueError(f"{group.file.filename!r}: {sub.name} should be a group")
        return _read_group(sub, lazy)
    raise ValueError(f"{group.file.filename!r}: unknown member tag {tag!r} at {group.name}")


def _read_sidpy(group):
    import sidpy

    info = _from_json(json.loads(group["info"].asstr()[()]))
    data = group["data"][()]
    ds = sidpy.Dataset.from_array(data, title=info["title"])
    ds.units, ds.quantity = info["units"], info["quantity"]
    ds.data_type, ds.modality, ds.source = info["data_type"], info["modality"], info["source"]
    for i, ax in enumerate(info["axes"]):
        ds.set_dimension(i, sidpy.Dimension(ax["values"], name=ax["name"], units=ax["units"],
                                            quantity=ax["quantity"],
                                            dimension_type=ax["dimension_type"]))
    ds.metadata = _from_json(json.loads(group["metadata"].asstr()[()]))
    ds.original_metadata = _from_json(json.loads(group["original_metadata"].asstr()[()]))
    return ds


def _read_group(group, lazy: bool) -> Any:
    kind = group.attrs.get("stemgpu_kind")
    if kind == "sidpy":
        return _read_sidpy(group)
    members = json.loads(group.attrs["stemgpu_members"])
    if kind == "dataclass":
        fields = {m["key"]: _read_member(group, m, lazy) for m in members}
        return _rebuild(group.attrs["stemgpu_class"], fields)
    if kind == "dict":
        return {_from_json(m["key"]): _read_member(group, m, lazy) for m in members}
    items = [_read_member(group, m, lazy) for m in members]
    if kind == "namedtuple":
        return _rebuild_namedtuple(group.attrs["stemgpu_class"], items)
    return tuple(items) if kind == "tuple" else items


# ============================================================================ provenance


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_source(obj: Any) -> str | None:
    """An input file path recorded on the object or a sidpy Dataset inside it."""
    for attr in ("source", "input_path", "source_path"):
        val = getattr(obj, attr, None)
        if isinstance(val, str | os.PathLike) and os.path.isfile(val):
            return os.fspath(val)
    if is_sidpy_dataset(obj):
        src = (getattr(obj, "metadata", {}) or {}).get("source", {})
        if isinstance(src, Mapping) and isinstance(src.get("path"), str):
            return src["path"]
        return None
    # one level down: a dict of named results, or an analysis' results
    members = obj if isinstance(obj, Mapping) else getattr(obj, "results", None)
    if isinstance(members, Mapping):
        for value in members.values():
            if is_sidpy_dataset(value):
                found = _find_source(value)
                if found is not None:
                    return found
    return None


def _provenance(writer: _Writer, obj: Any, source: Any) -> dict:
    from .. import __version__
    from ..backend import resolve_backend

    src_path = None
    if source is not None:
        src_path = _find_source(source) if not isinstance(source, str | os.PathLike) \
            else os.fspath(source)
    if src_path is None:
        src_path = _find_source(obj)
    src = None
    if src_path is not None:
        src = {"path": os.path.abspath(src_path), "sha256": None, "size_bytes": None}
        if os.path.isfile(src_path):
            src["sha256"] = _sha256(src_path)
            src["size_bytes"] = os.path.getsize(src_path)
    backend = "cupy" if "cupy" in writer.backends else (
        sorted(writer.backends)[0] if writer.backends else "numpy")
    try:
        device = resolve_backend(backend).device_name
    except Exception as exc:  # e.g. cupy results saved on a machine without a GPU
        device = f"unknown ({type(exc).__name__})"
    import h5py

    return {
        "stemgpu_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(),
        "object_type": _class_path(type(obj)),
        "backend": backend,
        "device": device,
        "parameters": writer.parameters,
        "source": src,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "platform": platform.platform(),
    }


# ============================================================================ public API


def _clean_stale_temps(directory: str) -> None:
    """Remove temporaries of this host whose writing process no longer exists."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for fname in names:
        if not (fname.startswith(".") and fname.endswith(_TMP_SUFFIX)):
            continue
        parts = fname[: -len(_TMP_SUFFIX)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != _HOST_TAG or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(directory, fname))
            except OSError:
                pass
        except PermissionError:  # alive, owned by someone else
            continue


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(obj: Any, path: str | os.PathLike, *, overwrite: bool = False, source: Any = None,
         compression: str | None = None, progress: bool = False) -> str:
    """Save a result, a dict of named results or an analysis to one HDF5 (pyNSID) file.

    Parameters
    ----------
    obj : dataclass result, mapping of name -> result, or object with a ``results`` mapping
        Any frozen-dataclass result of stemgpu (``RigidResult``, ``AtomFit``, ...), sidpy
        Datasets, arrays, or containers of them. Registered stacks and mean images (fields
        named ``registered``, ``warped``, ``mean``...) are also written as calibrated sidpy
        datasets readable by pyNSID / SciFiReaders.
    path : str or os.PathLike
        Target file (conventionally ``.h5``).
    overwrite : bool
        Replace an existing file (atomically; the old file stays intact if the write fails).
    source : str, os.PathLike or sidpy.Dataset, optional
        The input file, recorded in the provenance with its SHA-256. By default taken from a
        ``source`` attribute of ``obj`` or from a Dataset opened with ``stemgpu.open``.
    compression : {None, "gzip", "lzf"}
        HDF5 compression of the generic array datasets.
    progress : bool
        Progress bar while copying streamed (on-disk) stacks.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    TypeError
        Something in ``obj`` cannot be stored (the message names where).
    ValueError
        Unknown ``compression``.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from dataclasses import dataclass
    >>> import stemgpu
    >>> path = os.path.join(tempfile.mkdtemp(), "result.h5")
    >>> _ = stemgpu.save({"shifts": np.zeros((5, 2)), "note": "demo"}, path)
    >>> back = stemgpu.load(path)
    >>> back["shifts"].shape, back["note"]
    ((5, 2), 'demo')
    """
    import h5py

    if compression not in (None, "gzip", "lzf"):
        raise ValueError(f"compression must be None, 'gzip' or 'lzf'; got {compression!r}")
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r}: directory does not exist (for path={path!r})")
    _clean_stale_temps(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{_HOST_TAG}.{os.getpid()}."
                                  f"{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["stemgpu_format"] = FORMAT
            fh.attrs["stemgpu_format_version"] = FORMAT_VERSION
            writer = _Writer(fh, compression, progress)
            root = fh.create_group("stemgpu")
            top = "results" if (not dataclasses.is_dataclass(obj) and not isinstance(
                obj, Mapping) and isinstance(getattr(obj, "results", None), Mapping)) else None
            if top:  # an analysis-like object: store its results, remember its class
                writer.value(root, "root", dict(obj.results), "results")
                root.attrs["stemgpu_wrapper_class"] = _class_path(type(obj))
            else:
                entry = writer.value(root, "root", obj, "result")
                root.attrs["stemgpu_root"] = json.dumps({**entry, "name": "root"})
            prov = _provenance(writer, obj, source)
            root.create_dataset("provenance", data=_dumps(prov, "provenance"))
            from .. import __version__

            fh.attrs["stemgpu_version"] = __version__
            if _before_commit is not None:
                _before_commit(fh)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def _open_results(path: Any):
    import h5py

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path!r}: not a stemgpu results file (not readable as HDF5: "
                         f"{exc})") from None
    if fh.attrs.get("stemgpu_format") != FORMAT or "stemgpu" not in fh:
        fh.close()
        raise ValueError(f"{path!r}: not a stemgpu results file (no stemgpu_format "
                         "attribute); Nion files are read with stemgpu.open")
    version = int(fh.attrs.get("stemgpu_format_version", 0))
    if version > FORMAT_VERSION:
        fh.close()
        raise ValueError(f"{path!r}: results format version {version} is newer than this "
                         f"stemgpu reads ({FORMAT_VERSION}); upgrade stemgpu")
    return fh


def load(path: str | os.PathLike, *, lazy: bool = False) -> Any:
    """Load what :func:`save` wrote: the same types, arrays as NumPy, dtypes unchanged.

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        Return 3-D arrays (registered stacks) as :class:`~stemgpu.io.lazy.LazyStack` read on
        demand instead of loading them.

    Returns
    -------
    object
        The saved dataclass / dict / list. An analysis-like object is rebuilt as
        ``cls(results=...)`` when possible, else its ``results`` dict is returned.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a stemgpu results file, or written by a newer format version.

    Examples
    --------
    >>> import os, tempfile, numpy as np, stemgpu
    >>> path = stemgpu.save([np.arange(3, dtype="i2")], os.path.join(tempfile.mkdtemp(), "r.h5"))
    >>> stemgpu.load(path)[0].dtype
    dtype('int16')
    """
    with _open_results(path) as fh:
        root = fh["stemgpu"]
        wrapper = root.attrs.get("stemgpu_wrapper_class")
        if wrapper is not None:
            results = _read_group(root["root"], lazy)
            try:
                cls = _import_class(wrapper)
                return cls(results=results)
            except Exception as exc:
                warnings.warn(f"could not rebuild {wrapper} ({type(exc).__name__}: {exc}); "
                              "returning its results dict", stacklevel=2)
                return results
        entry = json.loads(root.attrs["stemgpu_root"])
        return _read_member(root, entry, lazy)


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance record of a results file (version, backend, device, parameters, source).

    Examples
    --------
    >>> import os, tempfile, numpy as np, stemgpu
    >>> from stemgpu.io.results import read_provenance
    >>> path = stemgpu.save({"a": 1}, os.path.join(tempfile.mkdtemp(), "r.h5"))
    >>> read_provenance(path)["stemgpu_version"] == stemgpu.__version__
    True
    """
    with _open_results(path) as fh:
        return _from_json(json.loads(fh["stemgpu/provenance"].asstr()[()]))
