"""Read the files Nion Swift writes as calibrated ``sidpy.Dataset``s.

Nion Swift writes two layouts of one data item's *properties* (a JSON dict):

- the **library layout**, which its project storage writes for every item it keeps:
  ``dimensional_calibrations`` (one ``{"offset", "scale", "units"}`` per array axis),
  ``intensity_calibration``, the data descriptor (``is_sequence``,
  ``collection_dimension_count``, ``datum_dimension_count``), ``created`` (UTC, ISO 8601),
  ``timezone`` / ``timezone_offset``, ``metadata`` (``hardware_source`` with ``exposure``,
  ``instrument``, ...) and ``title``;
- the **export layout** ("NData 1", File > Export): the same calibrations under
  ``spatial_calibrations``, the timestamp as ``datetime_original`` / ``datetime_modified``
  (``{"local_datetime", "tz", "dst", "timezone"}``), ``metadata`` and a copy of its
  ``hardware_source`` under ``properties``.

and stores them in these files (the layout is read from the content, not from the name):

- ``.ndata``: a library item, a zip of ``data.npy`` + ``metadata.json`` (library layout);
- ``.ndata1``: a "NData 1" export, the same zip (export layout);
- ``.h5``: a large-format library item, an HDF5 dataset ``data`` with the properties as the
  JSON attribute ``properties`` (library layout);
- ``.nhdf``: a "NData HDF" export, HDF5 datasets ``data/0``, ``data/1``, ... each with its
  ``properties`` (library layout), and an ``index`` group;
- ``.tif`` / ``.tiff``: a "TIFF Files (ImageJ)" export, an ImageJ hyperstack with a ``nion.1``
  JSON block (export layout, see :mod:`stemgpu.io.tiff`).

Files are opened read-only and stacks are lazy: an uncompressed ``data.npy`` or TIFF is
memory-mapped and HDF5 frames are read on demand, so opening a 100 GB stack costs nothing until
frames are used. HDF5 files are opened without the HDF5 file lock: Nion Swift keeps every
``.h5`` item of an open project open in append mode, which would otherwise refuse every reader.
An item read while Nion Swift is still acquiring into it holds what Nion Swift has flushed so
far; one caught before its data or properties exist is refused with a message saying so.

:func:`open` (``stemgpu.open``) and :func:`open_frames` (``stemgpu.open_frames``) also read
other microscopes' files (DM3/DM4, EMD, TIA ``.ser``, HSPY, plain TIFF) through RosettaSciIO,
see :mod:`stemgpu.io.formats`. Every Dataset they return remembers its source file:
:func:`source_of`.
"""

from __future__ import annotations

import builtins
import datetime
import json
import math
import numbers
import os
import zipfile
from typing import Any

import numpy as np

from .._checks import check_real
from .._inputs import length_to_pm
from .lazy import LazyStack, npy_member_layout, open_hdf5
from .provenance import source_of, source_record

__all__ = ["NionFormatError", "open", "open_frames", "read_nion", "source_of", "source_record"]

_ZIP_EXT = (".ndata", ".ndata1")
_H5_EXT = (".h5", ".hdf5")
_NHDF_EXT = (".nhdf",)
_TIFF_EXT = (".tif", ".tiff")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TIME_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_MID_WRITE = ("if Nion Swift is acquiring into it, read it again when the acquisition has "
              "finished")


class NionFormatError(ValueError):
    """The file is not a readable Nion Swift data item (the message names the file)."""


def _fail(path: str, why: str) -> NionFormatError:
    return NionFormatError(f"{path!r}: {why}")


def _signature(path: str) -> bytes:
    with builtins.open(path, "rb") as fh:
        return fh.read(8)


# ============================================================================ containers


def _read_zip_properties(path: str) -> dict:
    head = _signature(path)
    if not head.startswith(b"PK"):
        raise _fail(path, "not a Nion file (an .ndata / .ndata1 file is a zip archive; this "
                          "is not)")
    try:
        with zipfile.ZipFile(path, "r") as zf:
            names = set(zf.namelist())
            if "data.npy" not in names or "metadata.json" not in names:
                raise _fail(path, "not a Nion file: the zip archive lacks data.npy and/or "
                                  f"metadata.json (members: {sorted(names)})")
            raw = zf.read("metadata.json")
    except zipfile.BadZipFile as exc:
        raise _fail(path, f"truncated or corrupt zip archive ({exc}); the file was probably "
                          "not copied completely") from None
    return _parse_properties(path, raw, "metadata.json")


def _parse_properties(path: str, raw: Any, where: str) -> dict:
    if isinstance(raw, bytes):
        # Nion Swift's NDataHandler writes the JSON as ISO-8859-1 bytes (ASCII-escaped)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("latin-1")
    try:
        props = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"{where} is not valid JSON ({exc})") from None
    if not isinstance(props, dict):
        raise _fail(path, f"{where} does not hold a properties dict")
    return props


def _open_h5(path: str):
    try:
        return open_hdf5(path)  # no file lock: Nion Swift holds its .h5 items open
    except OSError as exc:
        raise _fail(path, f"truncated or corrupt HDF5 file, or one caught mid-write ({exc}); "
                          f"{_MID_WRITE}") from None


def _read_h5_item(path: str) -> tuple[dict, str, tuple, np.dtype, dict]:
    """Properties, dataset name, shape and dtype of a Nion ``.h5`` item or ``.nhdf`` export."""
    import h5py

    if _signature(path) != _HDF5_MAGIC:
        raise _fail(path, "not a Nion file (not an HDF5 file)")
    extra: dict = {}
    with _open_h5(path) as fh:
        node = fh.get("data")
        if isinstance(node, h5py.Group):  # "NData HDF" export: data/0, data/1, ... + index
            keys = sorted(node.keys(), key=lambda k: (len(k), k))
            items = [k for k in keys if isinstance(node[k], h5py.Dataset)
                     and "properties" in node[k].attrs]
            if not items:
                raise _fail(path, "an NData HDF file without a data item (its 'data' group "
                                  f"holds {keys})")
            name = f"data/{items[0]}"
            extra = {"item": name, "items_in_file": len(items)}
        elif isinstance(node, h5py.Dataset) and "properties" in node.attrs:
            name = "data"
        else:
            top = sorted(fh.keys())
            if isinstance(node, h5py.Dataset):
                hint = (" (a 'data' dataset without properties: a Nion Swift item caught "
                        f"before its properties were written? {_MID_WRITE})")
            else:
                hint = (" (it looks like a stemgpu results file: use stemgpu.load)"
                        if "stemgpu" in top else "")
            raise _fail(path, "not a Nion file: expected a 'data' dataset with a JSON "
                              f"'properties' attribute; top-level entries: {top}{hint}")
        dset = fh[name]
        raw, shape, dtype = dset.attrs["properties"], tuple(dset.shape), np.dtype(dset.dtype)
    props = _parse_properties(path, raw, "the 'properties' attribute")
    if shape == (0,):
        raise _fail(path, "holds no data yet: Nion Swift has created this item but not written "
                          f"its data (mid-write); {_MID_WRITE}")
    return props, name, shape, dtype, extra


# ============================================================================ properties


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (free-form metadata is not trusted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _find(tree: Any, *keys: str):
    """First numeric value of any of ``keys`` in a nested dict (depth-first), else None."""
    if isinstance(tree, dict):
        for key in keys:
            if key in tree and _number(tree[key]) is not None:
                return _number(tree[key])
        for value in tree.values():
            found = _find(value, *keys)
            if found is not None:
                return found
    return None


def _calibration(path: str, where: str, cal: Any, *, required: bool = False) -> dict:
    """One ``{"offset", "scale", "units"}`` entry, checked (Nion's defaults for missing keys)."""
    if cal is None and not required:
        return {"offset": 0.0, "scale": 1.0, "units": ""}
    if not isinstance(cal, dict):
        raise _fail(path, f"malformed calibration: {where} must be a dict with 'offset', "
                          f"'scale' and 'units'; got {cal!r}")
    out = {}
    for key, default in (("offset", 0.0), ("scale", 1.0)):
        value = cal.get(key, default)
        value = default if value is None else value
        if _number(value) is None:
            raise _fail(path, f"malformed calibration: {where}[{key!r}] must be a finite "
                              f"number; got {value!r}")
        out[key] = float(value)
    units = cal.get("units", "")
    units = "" if units is None else units
    if not isinstance(units, str):
        raise _fail(path, f"malformed calibration: {where}['units'] must be a string; got "
                          f"{units!r}")
    out["units"] = units
    return out


def _count(path: str, props: dict, key: str, default):
    value = props.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _fail(path, f"malformed data descriptor: {key} must be an integer >= 0; got "
                          f"{value!r}")
    return int(value)


def _utc_from_export(item: Any) -> tuple[str | None, str | None, str | None]:
    """(UTC ISO time, tz offset, timezone) of an export's ``datetime_original`` dict."""
    if not isinstance(item, dict) or not isinstance(item.get("local_datetime"), str):
        return None, None, None
    tz = item.get("tz") if isinstance(item.get("tz"), str) else None
    try:
        local = datetime.datetime.fromisoformat(item["local_datetime"])
        minutes = 0
        if tz:
            minutes = (int(tz[1:3]) * 60 + int(tz[3:5])) * (-1 if tz[0] == "-" else 1)
    except (ValueError, IndexError):
        return None, tz, None
    utc = local.replace(tzinfo=None) - datetime.timedelta(minutes=minutes)
    zone = item.get("timezone") if isinstance(item.get("timezone"), str) else None
    return utc.isoformat(), tz, zone


def _normalise(path: str, props: dict, ndim: int) -> dict:
    """One view of either layout: calibrations, descriptor, times and metadata, all checked."""
    if "dimensional_calibrations" in props:
        layout, key = "library", "dimensional_calibrations"
    elif "spatial_calibrations" in props:
        layout, key = "export", "spatial_calibrations"
    else:
        layout = "export" if ("datetime_original" in props or "timestamp" in props) \
            else "library"
        key = None
    cals = props.get(key) if key else None
    if cals is not None and not isinstance(cals, list):
        raise _fail(path, f"malformed calibration: {key} must be a list with one "
                          f"{{'offset', 'scale', 'units'}} dict per axis; got {cals!r}")
    cals = [_calibration(path, f"{key}[{i}]", c) for i, c in enumerate(cals or [])]
    intensity = props.get("intensity_calibration")
    intensity = _calibration(path, "intensity_calibration", intensity) \
        if intensity is not None else None
    seq = props.get("is_sequence", None)
    if seq is not None and not isinstance(seq, bool | int):
        raise _fail(path, f"malformed data descriptor: is_sequence must be true or false; got "
                          f"{seq!r}")
    meta = props.get("metadata")
    if not isinstance(meta, dict):
        hw = props.get("properties")  # export layout and TIFF: hardware_source copied here
        meta = {"hardware_source": hw} if isinstance(hw, dict) else {}
    view = {
        "layout": layout, "calibration_key": key or "dimensional_calibrations",
        "calibrations": cals, "intensity": intensity,
        "described": any(k in props for k in ("is_sequence", "collection_dimension_count",
                                              "datum_dimension_count")),
        "is_sequence": bool(seq) if seq is not None else False,
        "collection": _count(path, props, "collection_dimension_count", 0),
        "datum": _count(path, props, "datum_dimension_count", None),
        "metadata": meta,
        "title": props.get("title") if isinstance(props.get("title"), str) else None,
        "timezone": props.get("timezone"), "timezone_offset": props.get("timezone_offset"),
        "created": None, "created_from": None,
    }
    if isinstance(props.get("created"), str):
        view["created"], view["created_from"] = props["created"], "created"
    elif isinstance(props.get("timestamp"), str):  # very old library items
        view["created"], view["created_from"] = props["timestamp"], "timestamp"
    elif "datetime_original" in props:
        utc, tz, zone = _utc_from_export(props["datetime_original"])
        if utc is not None:
            view["created"], view["created_from"] = utc, "datetime_original"
            view["timezone_offset"] = view["timezone_offset"] or tz
            view["timezone"] = view["timezone"] or zone
    elif _number(props.get("timestamp")) is not None:
        # TIFF export: POSIX seconds of Nion's naive UTC time taken as local time; read back
        # as Nion Swift's own TIFF reader does (local time of this machine)
        stamp = datetime.datetime.fromtimestamp(_number(props["timestamp"]))
        view["created"], view["created_from"] = stamp.isoformat(), "timestamp"
    return view


def _layout(path: str, view: dict, shape: tuple, dtype: np.dtype) -> str:
    """"image" or "stack", or an error describing what the file holds."""
    if dtype.kind not in "iuf":
        raise _fail(path, f"unsupported data type {dtype} (stemgpu reads real-valued "
                          "images; complex and RGB data items are not supported)")
    ndim = len(shape)
    seq, coll, datum = view["is_sequence"], view["collection"], view["datum"]
    if not view["described"] and ndim == 3:
        # items written before Nion Swift had data descriptors: a 3-D array is read as a
        # sequence of images only if its last axes are not calibrated in a non-length unit
        units = [c["units"] for c in view["calibrations"][-2:]]
        for unit in units:
            try:
                if unit:
                    length_to_pm(1.0, unit)
            except ValueError:
                raise _fail(path, f"unsupported dimensionality: shape {shape} with axes in "
                                  f"{units} (no data descriptor); stemgpu reads images and "
                                  "sequences of images") from None
        seq = True
    datum = datum if datum is not None else (2 if ndim in (2, 3) else ndim)
    described = int(seq) + coll + datum
    what = (f"shape {shape}, is_sequence={seq}, collection_dimension_count={coll}, "
            f"datum_dimension_count={datum}")
    if described != ndim:
        raise _fail(path, f"unsupported dimensionality: the descriptor does not match the "
                          f"data ({what}); RGB images are not supported")
    if datum == 2 and ndim == 2:
        return "image"
    if datum == 2 and ndim == 3 and (seq or coll == 1):
        return "stack"
    raise _fail(path, "unsupported dimensionality: stemgpu reads a 2-D image or a sequence "
                      f"of 2-D images (frame, y, x); this item has {what} (spectra, spectrum "
                      "images and 4-D STEM are not supported)")


def _spatial_calibration(path: str, view: dict, ndim: int, pixel_size: float | None):
    """Pixel size (pm) and origin (nm) of the two spatial axes."""
    cals = view["calibrations"]
    sizes, origins = [], []
    for cal in (cals[-2:] if len(cals) == ndim else []):
        units = cal["units"]
        try:
            scale_pm = length_to_pm(abs(cal["scale"]), units) if units else None
            origin_nm = length_to_pm(cal["offset"], units) / 1000.0 if units else 0.0
        except ValueError:  # not a length unit (eV, 1/nm, ...)
            scale_pm, origin_nm = None, 0.0
        sizes.append(scale_pm if scale_pm else None)
        origins.append(origin_nm)
    if pixel_size is not None:
        value = check_real(pixel_size, "pixel_size", greater=0)
        return value, tuple(origins) if len(origins) == 2 else (0.0, 0.0), "pixel_size="
    if len(sizes) != 2 or None in sizes:
        found = json.dumps(cals[-2:]) if cals else "none"
        raise _fail(path, f"missing spatial calibration ({view['calibration_key']} of the y/x "
                          f"axes: {found}); pass pixel_size= (pm per pixel) to read it anyway")
    if abs(sizes[0] - sizes[1]) > 1e-3 * max(sizes):
        raise _fail(path, f"non-square pixels ({sizes[0]:.6g} pm x {sizes[1]:.6g} pm); stemgpu "
                          "assumes square pixels: pass pixel_size= to override")
    return float(sizes[0]), tuple(origins), "file"


def _frame_time(view: dict, layout: str, shape: tuple) -> tuple[float | None, str | None]:
    if layout != "stack":
        return None, None
    cals = view["calibrations"]
    if len(cals) == 3:
        units = cals[0]["units"].strip().lower()
        if units in _TIME_TO_S and cals[0]["scale"]:
            return abs(cals[0]["scale"]) * _TIME_TO_S[units], "sequence calibration"
    meta = view["metadata"]
    value = _find(meta, "frame_time", "frame_time_s")
    if value is not None:
        return value, "metadata frame_time"
    hw = meta.get("hardware_source")
    value = _find(hw if isinstance(hw, dict) else {}, "exposure")
    if value is not None:
        return value, "hardware_source exposure"
    value = _find(meta, "pixel_time_us")
    if value is not None:
        return value * 1e-6 * shape[1] * shape[2], "pixel_time_us x pixels (no flyback)"
    return None, None


def _normalised_metadata(view, pixel_size_pm, pixel_source, frame_time, frame_time_source,
                         layout, shape) -> dict:
    meta = view["metadata"]
    hw = meta.get("hardware_source") if isinstance(meta.get("hardware_source"), dict) else {}
    name = hw.get("hardware_source_name", hw.get("hardware_source_id"))
    out = {
        "pixel_size_pm": pixel_size_pm,
        "pixel_size_source": pixel_source,
        "layout": layout,
        "shape": list(shape),
        "created": view["created"],
        "created_from": view["created_from"],
        "timezone": view["timezone"],
        "timezone_offset": view["timezone_offset"],
        "intensity_calibration": view["intensity"],
        "exposure_s": _number(hw.get("exposure")) if "exposure" in hw else _find(meta,
                                                                                 "exposure"),
        "frame_time_s": frame_time,
        "frame_time_source": frame_time_source,
        "pixel_time_us": _find(meta, "pixel_time_us"),
        "hardware_source": name if isinstance(name, str) else None,
    }
    return {k: v for k, v in out.items() if v is not None}


# ============================================================================ reading


def _check_path(path: Any) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a Nion data item file")
    return path


def _container(path: str) -> str:
    """"zip", "hdf5", "tiff" or "other", from the signature (the name decides ties)."""
    lower, head = path.lower(), _signature(path)
    if lower.endswith(_ZIP_EXT) or (not lower.endswith(_H5_EXT + _NHDF_EXT + _TIFF_EXT)
                                    and head.startswith(b"PK")):
        return "zip"
    if lower.endswith(_H5_EXT + _NHDF_EXT) or head == _HDF5_MAGIC:
        return "hdf5"
    if lower.endswith(_TIFF_EXT) or head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00",
                                                 b"MM\x00+"):
        return "tiff"
    return "other"


def _inspect(path: str, pixel_size: float | None, *, checksum: bool):
    """Everything about a Nion file but its pixels; raises NionFormatError for anything else."""
    container = _container(path)
    extra: dict = {}
    if container == "zip":
        props = _read_zip_properties(path)
        try:
            offset, shape, dtype, _fortran = npy_member_layout(path, "data.npy")
        except zipfile.BadZipFile as exc:
            raise _fail(path, f"truncated or corrupt zip archive ({exc})") from None
        except ValueError as exc:
            raise _fail(path, f"data.npy is not a valid .npy array ({exc})") from None
        storage, member = ("memmap" if offset is not None else "zip-compressed"), "data.npy"
    elif container == "hdf5":
        props, member, shape, dtype, extra = _read_h5_item(path)
        storage = "hdf5"
    elif container == "tiff":
        from .tiff import nion_tiff_properties

        try:
            props, shape, dtype = nion_tiff_properties(path)
        except ImportError:
            raise
        except ValueError as exc:
            raise _fail(path, str(exc)) from None
        except Exception as exc:  # tifffile.TiffFileError and friends
            raise _fail(path, f"not a readable TIFF file ({exc})") from None
        if props is None:
            raise _fail(path, "not a Nion file: a TIFF without Nion Swift's 'nion.1' metadata "
                              "block (stemgpu.open reads other TIFFs through RosettaSciIO)")
        storage, member = "tiff", None
    else:
        raise _fail(path, "not a Nion file (expected an .ndata / .ndata1 zip archive, an .h5 "
                          "or .nhdf HDF5 file or a Nion Swift TIFF export)")
    view = _normalise(path, props, len(shape))
    layout = _layout(path, view, shape, dtype)
    px, origin, px_source = _spatial_calibration(path, view, len(shape), pixel_size)
    frame_time, ft_source = _frame_time(view, layout, shape)
    meta = _normalised_metadata(view, px, px_source, frame_time, ft_source, layout, shape)
    fmt = {"zip": "nion-ndata1" if view["layout"] == "export" else "nion-ndata",
           "hdf5": "nion-nhdf" if member != "data" else "nion-h5",
           "tiff": "nion-tiff"}[container]
    meta = {"source": source_record(path, fmt, storage, checksum=checksum,
                                    layout=view["layout"], **extra), **meta}
    return {"path": path, "props": props, "view": view, "layout": layout, "px": px,
            "origin": origin, "frame_time": frame_time, "meta": meta, "member": member,
            "storage": storage}


def _source(item: dict) -> LazyStack:
    kwargs = {"pixel_size_pm": item["px"], "metadata": item["meta"],
              "original_metadata": item["props"]}
    if item["storage"] == "hdf5":
        return LazyStack.from_hdf5(item["path"], item["member"], **kwargs)
    if item["storage"] == "tiff":
        from .tiff import open_tiff

        return open_tiff(item["path"], **kwargs)
    return LazyStack.from_zip_npy(item["path"], item["member"], **kwargs)


def _is_nion(path: str) -> bool:
    """Whether ``path`` should go to the Nion reader (anything else goes to RosettaSciIO)."""
    from .formats import EXTENSIONS

    container = _container(path)
    if container == "zip":
        return True
    lower = os.path.splitext(path.lower())[1]
    if container == "hdf5":
        return lower not in EXTENSIONS  # .emd / .hspy are HDF5 too
    if container == "tiff":
        from .tiff import nion_tiff_properties

        try:
            return nion_tiff_properties(path)[0] is not None
        except ImportError:
            return lower not in EXTENSIONS
        except Exception:
            return False  # RosettaSciIO (or its error) has the last word
    return lower not in EXTENSIONS


def read_nion(path: str | os.PathLike, *, lazy: bool = True, pixel_size: float | None = None):
    """Read a Nion Swift file as a calibrated ``sidpy.Dataset``.

    Reads ``.ndata`` library items, ``.ndata1`` ("NData 1") exports, ``.h5`` library items
    (also while Nion Swift holds them open), ``.nhdf`` ("NData HDF") exports and Nion Swift
    TIFF exports; the layout is read from the content, so a renamed file reads the same.

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        Keep the data on disk (memory-mapped zip or TIFF, HDF5 reads on demand, chunked by
        whole frames). ``False`` reads everything into memory now, and the file's SHA-256
        with it.
    pixel_size : float, optional
        Pixel size in pm; overrides the file's calibration, and is required when the file
        has none.

    Returns
    -------
    sidpy.Dataset
        ``(frame, y, x)`` for a sequence (frame axis TEMPORAL: seconds when the frame time
        is known, else frame index) or ``(y, x)`` for an image; y/x SPATIAL in nm, starting
        at the file's origin. ``metadata`` holds the normalised calibration, timestamps
        (``created`` in UTC, ``timezone``, ``timezone_offset``) and exposure/frame time
        (keys ``pixel_size_pm``, ``created``, ``exposure_s``, ``frame_time_s``) and the
        provenance record ``source`` (see :func:`source_of`); ``original_metadata`` is the
        file's complete properties dict.

    Raises
    ------
    FileNotFoundError
        No such file.
    NionFormatError (a ValueError)
        Not a Nion file, truncated/corrupt archive, an item Nion Swift is still writing,
        malformed or missing calibration without ``pixel_size=``, non-square pixels, or
        unsupported dimensionality/dtype; the message names the file.
    TypeError
        ``path`` is not a path.
    ValueError
        ``pixel_size`` is not a finite number > 0.

    Examples
    --------
    >>> import io, json, os, tempfile, zipfile, numpy as np
    >>> from stemgpu.io.nion import read_nion
    >>> # Nion Swift's "NData 1" export of a 4-frame sequence: calibrations per axis
    >>> props = {"spatial_calibrations": [{"offset": 0, "scale": 0.5, "units": "s"}]
    ...          + [{"offset": 0, "scale": 0.0146, "units": "nm"}] * 2,
    ...          "is_sequence": True, "collection_dimension_count": 0,
    ...          "datum_dimension_count": 2}
    >>> npy = io.BytesIO(); np.save(npy, np.ones((4, 8, 8), "f4"))
    >>> path = os.path.join(tempfile.mkdtemp(), "seq.ndata1")
    >>> with zipfile.ZipFile(path, "w") as zf:
    ...     zf.writestr("metadata.json", json.dumps(props)); zf.writestr("data.npy", npy.getvalue())
    >>> ds = read_nion(path)
    >>> ds.shape, ds.metadata["pixel_size_pm"], ds.metadata["frame_time_s"], ds._axes[1].units
    ((4, 8, 8), 14.6, 0.5, 'nm')
    """
    from .sidpy_io import to_dataset

    path = _check_path(path)
    item = _inspect(path, pixel_size, checksum=not lazy)
    src = _source(item)
    if lazy:
        data = src
    else:
        data = np.asarray(src)
        src.close()
    view = item["view"]
    title = view["title"] or os.path.splitext(os.path.basename(path))[0]
    intensity = view["intensity"] or {}
    ds = to_dataset(data, pixel_size=item["px"], title=title,
                    units=str(intensity.get("units") or "counts"), quantity="intensity",
                    frame_time_s=item["frame_time"] if item["layout"] == "stack" else None,
                    origin_nm=item["origin"], metadata=item["meta"],
                    original_metadata=item["props"])
    ds.metadata["source"] = item["meta"]["source"]  # one record, shared with the source
    ds.source = os.path.abspath(path)
    ds.modality = "STEM"
    return ds


def open_frames(path: str | os.PathLike, *, pixel_size: float | None = None) -> LazyStack:
    """Open a microscope file as a lazy frame source for streaming (no sidpy involved).

    Reads every file :func:`open` reads. The returned :class:`~stemgpu.io.lazy.LazyStack`
    carries ``pixel_size_pm``, the normalised ``metadata`` (with the provenance record
    ``metadata["source"]``, see :func:`source_of`) and the file's ``original_metadata``; pass
    it to ``stemgpu.register_rigid`` to register a stack larger than memory.

    Parameters
    ----------
    path : str or os.PathLike
    pixel_size : float, optional
        Pixel size in pm; overrides (or replaces a missing) file calibration.

    Returns
    -------
    LazyStack

    Raises
    ------
    FileNotFoundError, NionFormatError, TypeError, ImportError
        As :func:`open`.

    Examples
    --------
    >>> import io, json, os, tempfile, zipfile, numpy as np
    >>> from stemgpu.io.nion import open_frames
    >>> # a Nion Swift library item (.ndata): sequence of 4 frames at 14.6 pm
    >>> props = {"dimensional_calibrations": [{"offset": 0, "scale": 1, "units": ""}]
    ...          + [{"offset": 0, "scale": 0.0146, "units": "nm"}] * 2, "is_sequence": True,
    ...          "collection_dimension_count": 0, "datum_dimension_count": 2}
    >>> npy = io.BytesIO(); np.save(npy, np.ones((4, 8, 8), "f4"))
    >>> path = os.path.join(tempfile.mkdtemp(), "seq.ndata")
    >>> with zipfile.ZipFile(path, "w") as zf:
    ...     zf.writestr("data.npy", npy.getvalue()); zf.writestr("metadata.json", json.dumps(props))
    >>> src = open_frames(path)
    >>> src.shape, src.pixel_size_pm, src.kind
    ((4, 8, 8), 14.6, 'memmap')
    """
    path = _check_path(path)
    if not _is_nion(path):
        from .formats import open_frames as open_other

        return open_other(path, pixel_size=pixel_size)
    return _source(_inspect(path, pixel_size, checksum=False))


def open(path: str | os.PathLike, *, lazy: bool = True, pixel_size: float | None = None):
    """Open a microscope file as a calibrated ``sidpy.Dataset`` (the entry point ``stemgpu.open``).

    Nion Swift files (``.ndata``, ``.ndata1``, ``.h5``, ``.nhdf``, Nion TIFF exports) are read
    by :func:`read_nion`; DM3/DM4, EMD (Velox, Berkeley), TIA ``.ser``, HSPY and other TIFFs
    through RosettaSciIO (:func:`stemgpu.io.formats.read_file`, ``pip install
    'stemgpu[formats]'``). Either way the Dataset has the same shape, axes, calibration and
    metadata keys, and remembers its source (:func:`source_of`).

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        Keep the data on disk until used.
    pixel_size : float, optional
        Pixel size in pm; overrides (or replaces a missing) file calibration.

    Returns
    -------
    sidpy.Dataset

    Raises
    ------
    FileNotFoundError, NionFormatError, TypeError
        As :func:`read_nion`; NionFormatError also for a file of no format stemgpu reads
        (an HDF5 file that is no Nion item is read as pyNSID when it is one, into memory).
    ImportError
        A non-Nion format without RosettaSciIO installed (the message names the extra).

    Examples
    --------
    >>> import io, json, os, tempfile, zipfile, numpy as np
    >>> import stemgpu
    >>> # a Nion Swift library item (.ndata): an image at 14.6 pm
    >>> props = {"dimensional_calibrations": [{"offset": 0, "scale": 0.0146, "units": "nm"}] * 2}
    >>> npy = io.BytesIO(); np.save(npy, np.ones((8, 8), "f4"))
    >>> path = os.path.join(tempfile.mkdtemp(), "image.ndata")
    >>> with zipfile.ZipFile(path, "w") as zf:
    ...     zf.writestr("data.npy", npy.getvalue()); zf.writestr("metadata.json", json.dumps(props))
    >>> ds = stemgpu.open(path)
    >>> ds.shape, ds.metadata["pixel_size_pm"], ds.metadata["source"]["format"]
    ((8, 8), 14.6, 'nion-ndata')
    """
    path = _check_path(path)
    if not _is_nion(path):
        from .formats import read_file

        return read_file(path, lazy=lazy, pixel_size=pixel_size)
    try:
        return read_nion(path, lazy=lazy, pixel_size=pixel_size)
    except NionFormatError as nion_error:
        from .nsid import read_nsid_or_raise

        # An HDF5 file that is no Nion item may be a pyNSID file (read into memory).
        return read_nsid_or_raise(path, nion_error, pixel_size=pixel_size)
