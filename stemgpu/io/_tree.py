"""The HDF5 tree of a results file: :class:`Writer` writes a value, :func:`read_member` and
:func:`read_group` read it back.

A frozen dataclass becomes a group recording its class path; array fields become datasets
(never attributes: pyNSID silently drops attributes over 64 KB, so a large atom table would
vanish), scalar fields become attributes, nested dataclasses become subgroups, dicts / lists /
tuples without large arrays become one JSON dataset (:mod:`stemgpu.io._codec`); ``None``
fields are recorded as such. Each group lists its members (key, name, tag) in the attribute
``stemgpu_members``. Image-like fields (:data:`IMAGE_FIELDS`) and sidpy Datasets are written
by pyNSID under ``/Measurement_000/Channel_NNN`` and hard-linked into the tree, so they are
stored once. Lazy arrays (h5py datasets, :class:`~stemgpu.io.lazy.LazyStack`) are copied frame
batch by frame batch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._inputs import is_frame_source, is_sidpy_dataset
from .._progress import progress_bar
from ..backend import is_cupy_array, to_host
from ._codec import (
    array_subclass,
    as_subclass,
    class_path,
    dumps,
    from_json,
    rebuild,
    rebuild_namedtuple,
    to_json,
)
from .sidpy_io import image_axes

__all__ = ["IMAGE_FIELDS", "Writer", "is_array", "read_group", "read_member"]

#: dataclass fields written as pyNSID sidpy datasets (and the dimensionality they need)
IMAGE_FIELDS = {"registered": 3, "warped": 3, "mean": 2, "mean_image": 2, "image": 2}
#: containers holding a larger array than this are written as groups, not JSON
_JSON_ARRAY_LIMIT = 4096
_LONG_STRING = 8192


def is_array(obj: Any) -> bool:
    """NumPy, CuPy or lazy array (a memmap counts as NumPy: it is written in one piece)."""
    return isinstance(obj, np.ndarray) or is_cupy_array(obj) or is_frame_source(obj,
                                                                                memmap=False)


# ---------------------------------------------------------------------------- writing


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _needs_group(obj: Any) -> bool:
    """Containers that hold dataclasses, sidpy Datasets or large arrays become groups."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return True
    if is_sidpy_dataset(obj) or is_frame_source(obj, memmap=False):
        return True
    if isinstance(obj, np.ndarray) or is_cupy_array(obj):
        return obj.nbytes > _JSON_ARRAY_LIMIT and not obj.dtype.hasobject
    if isinstance(obj, Mapping):
        return any(_needs_group(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_needs_group(v) for v in obj)
    return False


def _h5_name(key: Any, index: int, used: set) -> str:
    if (isinstance(key, str) and key and "/" not in key and "\x00" not in key
            and key not in (".", "..")
            and not key.startswith("stemgpu_") and key not in used):
        return key
    name = f"item_{index}"
    while name in used:
        name += "_"
    return name


class Writer:
    """Writes a value tree into an open h5py file: groups, datasets, attributes, pyNSID images.

    ``parameters`` collects every result's ``parameters`` dict by its place in the tree and
    ``backends`` the backends seen, for the provenance record.
    """

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
        if is_frame_source(value, memmap=False):
            return self._lazy_array(group, name, value)
        sub = array_subclass(value, where)
        arr = to_host(value)
        if arr.dtype.hasobject:
            group.create_dataset(name, data=dumps(arr, where))
            return {"tag": "json"}
        entry = {"tag": "array"}
        if sub is not None:
            entry["subclass"] = sub
        if arr.dtype.kind == "U":  # HDF5 has no UCS-4 strings: store the code points
            chars = arr.dtype.itemsize // 4
            group.create_dataset(name, data=np.ascontiguousarray(arr).reshape(-1).view(
                np.uint32).reshape((*arr.shape, chars)) if arr.size and chars else
                np.zeros((*arr.shape, chars if not arr.size else 0), np.uint32))
            return {**entry, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        kwargs = {}
        if self.compression and arr.size > 1:
            kwargs = {"compression": self.compression, "chunks": True}
        order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous \
            else "C"
        try:
            group.create_dataset(name, data=np.asarray(arr), **kwargs)
        except TypeError:  # a dtype HDF5 has no type for (datetime64, text fields...): exact JSON
            if name in group:
                del group[name]
            group.create_dataset(name, data=dumps(value, where))
            return {"tag": "json"}
        if order == "F":
            entry["order"] = "F"
        return entry

    def masked(self, group, name: str, value: Any, where: str) -> dict:
        """A masked array as a group: its data, its full mask and its fill value."""
        sub = group.create_group(name)
        sub.attrs["stemgpu_kind"] = "masked"
        sub.attrs["stemgpu_hard_mask"] = bool(value.hardmask)
        members = []
        for key, part in (("data", np.ma.getdata(value)), ("mask", np.ma.getmaskarray(value)),
                          ("fill_value", value.fill_value)):
            entry = self.value(sub, key, part, f"{where}.{key}")
            members.append({"key": key, "name": key, **entry})
        sub.attrs["stemgpu_members"] = json.dumps(members)
        return {"tag": "group"}

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
        bar = progress_bar(self.progress, total=len(starts), desc="save", unit="batch")
        try:
            for start in starts:
                dset[start:start + batch] = to_host(src[start:start + batch])
                bar.update(1)
        finally:
            bar.close()

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
        px = getattr(owner, "pixel_size_pm", None)
        px = float(px) if isinstance(px, int | float | np.floating) and px and px > 0 else None
        if is_cupy_array(value):  # a lazy array stays lazy: copied frame batch by batch
            self.backends.add("cupy")
            value = to_host(value)
        # "result['rigid'].registered" -> "rigid_registered"
        title = re.sub(r"[^0-9A-Za-z]+", "_", where.removeprefix("result")).strip("_") or name
        main = self.nsid_array(value, title, px)
        group[name] = main  # hard link: one copy of the data, two names
        return {"tag": "array", "nsid": main.name}

    def nsid_array(self, value, title: str, pixel_size_pm: float | None):
        """An image or stack written in pyNSID's layout by h5py alone.

        What ``pyNSID.hdf_io.write_nsid_dataset`` writes for
        :func:`stemgpu.io.sidpy_io.to_dataset` of the array (the group and main dataset
        with their book-keeping attributes, one dimension-scale dataset per axis attached
        to the main dataset, the sidpy provenance group), without importing sidpy, pyNSID
        or dask: their imports alone take ~300 MB of memory, more than a streamed analysis
        of a large stack may use. A lazy array is copied frame batch by batch.
        """
        import platform
        import socket
        import time
        from datetime import datetime

        group = self.fh.require_group("Measurement_000").create_group(
            f"Channel_{self.channels:03d}")
        self.channels += 1
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in title) or "data"
        sub = group.create_group(safe)
        book = {"machine_id": socket.getfqdn(), "timestamp": time.strftime("%Y_%m_%d-%H_%M_%S"),
                "platform": platform.platform(), "sidpy_version": _version("sidpy"),
                "pyNSID_version": _version("pyNSID")}
        sub.attrs.update(book)
        shape = tuple(int(s) for s in value.shape)
        main = sub.create_dataset(safe, shape=shape, dtype=np.dtype(value.dtype))
        if is_frame_source(value, memmap=False):
            self._copy_frames(value, main)
        else:
            main[...] = np.asarray(value)
        scales = []
        for axis, (dim, values, units, quantity, kind) in enumerate(
                image_axes(shape, pixel_size_pm)):
            dset = sub.create_dataset(dim, data=values)
            dset.attrs.update({"name": dim, "units": units, "quantity": quantity,
                               "dimension_type": kind})
            scales.append((axis, dim, dset))
        main.attrs.update({"quantity": "intensity", "units": "counts",
                           "main_data_name": title,
                           "data_type": "IMAGE_STACK" if len(shape) == 3 else "IMAGE",
                           "modality": "generic", "source": "generic", **book})
        prov = sub.create_group("provenance").create_group("sidpy")
        prov.attrs["from_array_"] = f"_{book['sidpy_version']}_{datetime.now()}".replace(
            " ", "-")
        for axis, dim, dset in scales:  # pyNSID's link_as_main
            dset.make_scale(dim)
            main.dims[axis].label = dim
            main.dims[axis].attach_scale(dset)
        return main

    def sidpy(self, group, name, dataset, where) -> dict:
        main = self.nsid(dataset, str(getattr(dataset, "title", "") or name))
        sub = group.create_group(name)
        sub["data"] = main
        sub.create_dataset("metadata", data=dumps(dict(dataset.metadata or {}), where))
        sub.create_dataset("original_metadata",
                           data=dumps(dict(dataset.original_metadata or {}), where))
        axes = []
        for i in range(dataset.ndim):
            ax = dataset._axes[i]
            axes.append({"name": ax.name, "units": ax.units, "quantity": ax.quantity,
                         "dimension_type": ax.dimension_type.name,
                         "values": np.asarray(ax.values)})
        info = {"title": dataset.title, "units": dataset.units, "quantity": dataset.quantity,
                "data_type": dataset.data_type.name, "modality": dataset.modality,
                "source": dataset.source, "axes": axes}
        sub.create_dataset("info", data=dumps(info, where))
        sub.attrs["stemgpu_kind"] = "sidpy"
        return {"tag": "group", "nsid": main.name}

    # -------------------------------------------------------------- generic tree
    def value(self, group, name: str, value: Any, where: str, owner: Any = None) -> dict:
        if value is None:
            return {"tag": "none"}
        if is_sidpy_dataset(value):
            return self.sidpy(group, name, value, where)
        if isinstance(value, np.ma.MaskedArray):
            return self.masked(group, name, value, where)
        if is_array(value):
            ndim = len(value.shape)
            real = np.dtype(value.dtype).kind in "iuf"
            plain = not isinstance(value, np.ndarray) or array_subclass(value, where) is None
            if owner is not None and IMAGE_FIELDS.get(name) == ndim and real and plain:
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
        group.create_dataset(name, data=dumps(value, where))
        return {"tag": "json"}

    @staticmethod
    def scalar(group, name: str, value: Any) -> dict | None:
        """Store numbers and short strings as native attributes; None if not a scalar."""
        if isinstance(value, np.str_):  # h5py has no type for it: tagged JSON keeps it
            return None
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
        if isinstance(value, str) and len(value) <= _LONG_STRING and "\x00" not in value:
            # (HDF5 strings end at a NUL: such strings go to the tagged JSON, which escapes it)
            group.attrs[name] = value
            return {"tag": "scalar", "type": "str"}
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":
            group.attrs[name] = value
            return {"tag": "scalar", "type": "numpy", "dtype": value.dtype.str}
        return None

    def dataclass(self, group, obj: Any, where: str) -> None:
        group.attrs["stemgpu_kind"] = "dataclass"
        group.attrs["stemgpu_class"] = class_path(type(obj))
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
                group.attrs["stemgpu_class"] = class_path(type(obj))
        group.attrs["stemgpu_kind"] = kind
        used: set[str] = set()
        members = []
        for i, (key, val) in enumerate(items):
            name = _h5_name(key, i, used) if kind == "dict" else f"item_{i}"
            used.add(name)
            sub_where = f"{where}[{key!r}]"
            entry = self.value(group, name, val, sub_where, None)
            members.append({"key": to_json(key, where), "name": name, **entry})
        group.attrs["stemgpu_members"] = json.dumps(members)


# ---------------------------------------------------------------------------- reading


def read_member(group, entry: dict, lazy: bool) -> Any:
    """The member ``entry`` (one item of ``stemgpu_members``) of ``group``, rebuilt."""
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
        return from_json(json.loads(group[name].asstr()[()]))
    if tag == "array":
        dset = group[name]
        sub = entry.get("subclass")
        if "dtype" in entry:  # unicode array stored as code points
            raw = dset[()]
            dtype = np.dtype(entry["dtype"])
            if dtype.itemsize == 0 or raw.size == 0:
                return as_subclass(np.zeros(entry["shape"], dtype), sub)
            return as_subclass(np.ascontiguousarray(raw).reshape(-1).view(dtype).reshape(
                entry["shape"]), sub)
        if lazy and dset.ndim == 3 and sub is None:
            from .lazy import LazyStack

            return LazyStack.from_hdf5(dset.file.filename, dset.name)
        arr = dset[()]
        if not isinstance(arr, np.ndarray):  # a 0-d dataset reads as a scalar (or bytes)
            arr = np.array(arr, dtype=dset.dtype) if not isinstance(arr, bytes) \
                else np.array(arr)
        if entry.get("order") == "F":
            arr = np.asfortranarray(arr)
        return as_subclass(arr, sub)
    if tag == "group":
        sub = group[name]
        if not isinstance(sub, h5py.Group):
            raise ValueError(f"{group.file.filename!r}: {sub.name} should be a group")
        return read_group(sub, lazy)
    raise ValueError(f"{group.file.filename!r}: unknown member tag {tag!r} at {group.name}")


def _read_sidpy(group):
    import sidpy

    info = from_json(json.loads(group["info"].asstr()[()]))
    data = group["data"][()]
    ds = sidpy.Dataset.from_array(data, title=info["title"])
    ds.units, ds.quantity = info["units"], info["quantity"]
    ds.data_type, ds.modality, ds.source = info["data_type"], info["modality"], info["source"]
    for i, ax in enumerate(info["axes"]):
        ds.set_dimension(i, sidpy.Dimension(ax["values"], name=ax["name"], units=ax["units"],
                                            quantity=ax["quantity"],
                                            dimension_type=ax["dimension_type"]))
    ds.metadata = from_json(json.loads(group["metadata"].asstr()[()]))
    ds.original_metadata = from_json(json.loads(group["original_metadata"].asstr()[()]))
    return ds


def read_group(group, lazy: bool) -> Any:
    """A dataclass, dict, list, tuple, named tuple or sidpy Dataset written as a group."""
    kind = group.attrs.get("stemgpu_kind")
    if kind == "sidpy":
        return _read_sidpy(group)
    members = json.loads(group.attrs["stemgpu_members"])
    if kind == "masked":
        parts = {m["key"]: read_member(group, m, False) for m in members}
        return np.ma.masked_array(parts["data"], mask=parts["mask"],
                                  fill_value=parts["fill_value"],
                                  hard_mask=bool(group.attrs.get("stemgpu_hard_mask", False)))
    if kind == "dataclass":
        fields = {m["key"]: read_member(group, m, lazy) for m in members}
        return rebuild(group.attrs["stemgpu_class"], fields)
    if kind == "dict":
        return {from_json(m["key"]): read_member(group, m, lazy) for m in members}
    items = [read_member(group, m, lazy) for m in members]
    if kind == "namedtuple":
        return rebuild_namedtuple(group.attrs["stemgpu_class"], items)
    return tuple(items) if kind == "tuple" else items
