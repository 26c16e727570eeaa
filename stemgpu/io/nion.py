"""Read Nion Swift data items (``.ndata1`` and ``.h5``) as calibrated ``sidpy.Dataset``s.

Nion Swift stores a data item either as

- ``.ndata1``: a zip archive holding ``data.npy`` (the array, normally stored uncompressed)
  and ``metadata.json`` (the item's *properties* dict), or
- ``.h5``: an HDF5 file with a ``data`` dataset whose ``properties`` attribute is the same
  dict as a JSON string.

The properties hold ``dimensional_calibrations`` (one ``{"offset", "scale", "units"}`` per
axis), ``intensity_calibration``, the data descriptor (``is_sequence``,
``collection_dimension_count``, ``datum_dimension_count``), ``created``/``timestamp`` and
the acquisition ``metadata`` (``hardware_source`` with ``exposure`` etc.).

Files are opened read-only (never in append mode) and stacks are lazy: an uncompressed
``data.npy`` is memory-mapped and HDF5 frames are read on demand, so opening a 100 GB stack
costs nothing until frames are used.
"""

from __future__ import annotations

import builtins
import json
import os
import zipfile
from typing import Any

import numpy as np

from .._inputs import length_to_pm
from .lazy import LazyStack, npy_member_layout

__all__ = ["NionFormatError", "open", "open_frames", "read_nion"]

_ZIP_EXT = (".ndata1", ".ndata")
_H5_EXT = (".h5", ".hdf5")
_TIME_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class NionFormatError(ValueError):
    """The file is not a readable Nion Swift data item (the message names the file)."""


def _fail(path: str, why: str) -> NionFormatError:
    return NionFormatError(f"{path!r}: {why}")


def _signature(path: str) -> bytes:
    with builtins.open(path, "rb") as fh:
        return fh.read(8)


def _read_zip_properties(path: str) -> dict:
    head = _signature(path)
    if not head.startswith(b"PK"):
        raise _fail(path, "not a Nion file (an .ndata1 file is a zip archive; this is not)")
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
    try:
        props = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"metadata.json is not valid JSON ({exc})") from None
    if not isinstance(props, dict):
        raise _fail(path, "metadata.json does not hold a properties dict")
    return props


def _read_h5_properties(path: str) -> dict:
    import h5py

    if _signature(path) != b"\x89HDF\r\n\x1a\n":
        raise _fail(path, "not a Nion file (not an HDF5 file)")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise _fail(path, f"truncated or corrupt HDF5 file ({exc})") from None
    with fh:
        dset = fh.get("data")
        if not isinstance(dset, h5py.Dataset) or "properties" not in dset.attrs:
            top = sorted(fh.keys())
            hint = (" (it looks like a stemgpu results file: use stemgpu.load)"
                    if "stemgpu" in top else "")
            raise _fail(path, "not a Nion file: expected a 'data' dataset with a JSON "
                              f"'properties' attribute; top-level entries: {top}{hint}")
        raw = dset.attrs["properties"]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        props = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"the 'properties' attribute is not valid JSON ({exc})") from None
    if not isinstance(props, dict):
        raise _fail(path, "the 'properties' attribute does not hold a dict")
    return props


def _find(tree: Any, *keys: str):
    """First value of any of ``keys`` in a nested dict (depth-first), else None."""
    if isinstance(tree, dict):
        for key in keys:
            if key in tree and not isinstance(tree[key], dict):
                return tree[key]
        for value in tree.values():
            found = _find(value, *keys)
            if found is not None:
                return found
    return None


def _layout(path: str, props: dict, shape: tuple, dtype: np.dtype) -> str:
    """"image" or "stack", or an error describing what the file holds."""
    if dtype.kind not in "iuf":
        raise _fail(path, f"unsupported data type {dtype} (stemgpu reads real-valued "
                          "images; complex and RGB data items are not supported)")
    ndim = len(shape)
    described_keys = ("is_sequence", "collection_dimension_count", "datum_dimension_count")
    if not any(k in props for k in described_keys) and ndim == 3:
        # items written before Nion Swift had data descriptors: a 3-D array is read as a
        # sequence of images only if its last axes are not calibrated in a non-length unit
        units = [str((c or {}).get("units", "") or "")
                 for c in (props.get("dimensional_calibrations") or [])[-2:]]
        for unit in units:
            try:
                if unit:
                    length_to_pm(1.0, unit)
            except ValueError:
                raise _fail(path, f"unsupported dimensionality: shape {shape} with axes in "
                                  f"{units} (no data descriptor); stemgpu reads images and "
                                  "sequences of images") from None
        props = {**props, "is_sequence": True}
    seq = bool(props.get("is_sequence", False))
    coll = int(props.get("collection_dimension_count", 0) or 0)
    datum = props.get("datum_dimension_count")
    datum = int(datum) if datum is not None else (2 if ndim in (2, 3) else ndim)
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


def _spatial_calibration(path: str, props: dict, ndim: int, pixel_size: float | None):
    """Pixel size (pm) and origin (nm) of the two spatial axes."""
    cals = props.get("dimensional_calibrations") or []
    sizes, origins = [], []
    for cal in (cals[-2:] if len(cals) == ndim else []):
        cal = cal or {}
        units = str(cal.get("units", "") or "")
        try:
            scale_pm = length_to_pm(abs(float(cal.get("scale", 1.0))), units) if units else None
            origin_nm = length_to_pm(float(cal.get("offset", 0.0) or 0.0), units) / 1000.0 \
                if units else 0.0
        except (TypeError, ValueError):
            scale_pm, origin_nm = None, 0.0
        sizes.append(scale_pm if scale_pm else None)
        origins.append(origin_nm)
    if pixel_size is not None:
        value = float(pixel_size)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"pixel_size must be a positive number in pm; got {pixel_size!r}")
        return value, tuple(origins) if len(origins) == 2 else (0.0, 0.0), "pixel_size="
    if len(sizes) != 2 or None in sizes:
        found = json.dumps(cals[-2:]) if cals else "none"
        raise _fail(path, "missing spatial calibration (dimensional_calibrations of the y/x "
                          f"axes: {found}); pass pixel_size= (pm per pixel) to read it anyway")
    if abs(sizes[0] - sizes[1]) > 1e-3 * max(sizes):
        raise _fail(path, f"non-square pixels ({sizes[0]:.6g} pm x {sizes[1]:.6g} pm); stemgpu "
                          "assumes square pixels: pass pixel_size= to override")
    return float(sizes[0]), tuple(origins), "file"


def _frame_time(props: dict, layout: str, shape: tuple) -> tuple[float | None, str | None]:
    if layout != "stack":
        return None, None
    cals = props.get("dimensional_calibrations") or []
    if len(cals) == 3 and isinstance(cals[0], dict):
        units = str(cals[0].get("units", "") or "").strip().lower()
        scale = cals[0].get("scale")
        if units in _TIME_TO_S and scale:
            return abs(float(scale)) * _TIME_TO_S[units], "sequence calibration"
    meta = props.get("metadata") or {}
    value = _find(meta, "frame_time", "frame_time_s")
    if value is not None:
        return float(value), "metadata frame_time"
    value = _find(meta.get("hardware_source", {}) if isinstance(meta, dict) else {}, "exposure")
    if value is not None:
        return float(value), "hardware_source exposure"
    value = _find(meta, "pixel_time_us")
    if value is not None:
        return float(value) * 1e-6 * shape[1] * shape[2], "pixel_time_us x pixels (no flyback)"
    return None, None


def _normalised_metadata(path, fmt, kind, props, pixel_size_pm, pixel_source, frame_time,
                         frame_time_source, layout, shape) -> dict:
    meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
    hw = meta.get("hardware_source", {}) if isinstance(meta.get("hardware_source"), dict) else {}
    out = {
        "source": {"path": os.path.abspath(path), "format": fmt, "storage": kind},
        "pixel_size_pm": pixel_size_pm,
        "pixel_size_source": pixel_source,
        "layout": layout,
        "shape": list(shape),
        "created": props.get("created", props.get("timestamp")),
        "timezone": props.get("timezone"),
        "timezone_offset": props.get("timezone_offset"),
        "intensity_calibration": props.get("intensity_calibration"),
        "exposure_s": hw.get("exposure", _find(meta, "exposure")),
        "frame_time_s": frame_time,
        "frame_time_source": frame_time_source,
        "pixel_time_us": _find(meta, "pixel_time_us"),
        "hardware_source": hw.get("hardware_source_name", hw.get("hardware_source_id")),
    }
    return {k: v for k, v in out.items() if v is not None}


def _inspect(path: Any, pixel_size: float | None):
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a Nion data item file")
    lower = path.lower()
    head = _signature(path)
    if lower.endswith(_ZIP_EXT) or (not lower.endswith(_H5_EXT) and head.startswith(b"PK")):
        props = _read_zip_properties(path)
        try:
            offset, shape, dtype, _fortran = npy_member_layout(path, "data.npy")
        except zipfile.BadZipFile as exc:
            raise _fail(path, f"truncated or corrupt zip archive ({exc})") from None
        except ValueError as exc:
            raise _fail(path, f"data.npy is not a valid .npy array ({exc})") from None
        fmt, kind = "nion-ndata1", "memmap" if offset is not None else "zip-compressed"
    elif lower.endswith(_H5_EXT) or head == b"\x89HDF\r\n\x1a\n":
        import h5py

        props = _read_h5_properties(path)
        with h5py.File(path, "r") as fh:
            shape, dtype = tuple(fh["data"].shape), np.dtype(fh["data"].dtype)
        fmt, kind = "nion-h5", "hdf5"
    else:
        raise _fail(path, "not a Nion file (expected an .ndata1 zip archive or an .h5 file "
                          "with a 'data' dataset and a JSON 'properties' attribute)")
    layout = _layout(path, props, shape, dtype)
    px, origin, px_source = _spatial_calibration(path, props, len(shape), pixel_size)
    frame_time, ft_source = _frame_time(props, layout, shape)
    meta = _normalised_metadata(path, fmt, kind, props, px, px_source, frame_time, ft_source,
                                layout, shape)
    return path, fmt, props, layout, px, origin, frame_time, meta


def _source(path: str, fmt: str, px: float, meta: dict) -> LazyStack:
    if fmt == "nion-ndata1":
        return LazyStack.from_zip_npy(path, "data.npy", pixel_size_pm=px, metadata=meta)
    return LazyStack.from_hdf5(path, "data", pixel_size_pm=px, metadata=meta)


def open_frames(path: str | os.PathLike, *, pixel_size: float | None = None) -> LazyStack:
    """Open a Nion file as a lazy frame source for streaming (no sidpy involved).

    The returned :class:`~stemgpu.io.lazy.LazyStack` carries ``pixel_size_pm`` and the
    normalised ``metadata``; pass it to ``stemgpu.register_rigid`` to register a stack
    larger than memory.

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
    FileNotFoundError, NionFormatError, TypeError
        As :func:`read_nion`.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from stemgpu.io.nion import open_frames
    >>> from stemgpu.io.nion import _write_ndata1_for_doc as write  # test helper
    >>> path = write(os.path.join(tempfile.mkdtemp(), "seq.ndata1"), np.ones((4, 8, 8), "f4"))
    >>> src = open_frames(path)
    >>> src.shape, src.pixel_size_pm, src.kind
    ((4, 8, 8), 14.6, 'memmap')
    """
    path, fmt, _props, _layout_, px, _origin, _ft, meta = _inspect(path, pixel_size)
    return _source(path, fmt, px, meta)


def read_nion(path: str | os.PathLike, *, lazy: bool = True, pixel_size: float | None = None):
    """Read a Nion Swift ``.ndata1`` or ``.h5`` data item as a calibrated ``sidpy.Dataset``.

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        Keep the data on disk (memory-mapped ``.ndata1`` or HDF5 reads on demand, chunked by
        whole frames). ``False`` reads everything into memory now.
    pixel_size : float, optional
        Pixel size in pm; overrides the file's calibration, and is required when the file
        has none.

    Returns
    -------
    sidpy.Dataset
        ``(frame, y, x)`` for a sequence (frame axis TEMPORAL: seconds when the frame time
        is known, else frame index) or ``(y, x)`` for an image; y/x SPATIAL in nm.
        ``metadata`` holds the normalised calibration, timestamps and exposure/frame time
        (keys ``pixel_size_pm``, ``created``, ``exposure_s``, ``frame_time_s``, ``source``);
        ``original_metadata`` is the file's complete properties dict.

    Raises
    ------
    FileNotFoundError
        No such file.
    NionFormatError (a ValueError)
        Not a Nion file, truncated/corrupt archive, missing calibration without
        ``pixel_size=``, non-square pixels, or unsupported dimensionality/dtype; the
        message names the file.
    TypeError
        ``path`` is not a path.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from stemgpu.io.nion import read_nion
    >>> from stemgpu.io.nion import _write_ndata1_for_doc as write  # test helper
    >>> path = write(os.path.join(tempfile.mkdtemp(), "seq.ndata1"), np.ones((4, 8, 8), "f4"))
    >>> ds = read_nion(path)
    >>> ds.shape, ds.metadata["pixel_size_pm"], ds._axes[1].units
    ((4, 8, 8), 14.6, 'nm')
    """
    from .sidpy_io import to_dataset

    path, fmt, props, layout, px, origin, frame_time, meta = _inspect(path, pixel_size)
    src = _source(path, fmt, px, meta)
    if lazy:
        data = src
    else:
        data = np.asarray(src)
        src.close()
    title = str(props.get("title") or os.path.splitext(os.path.basename(path))[0])
    intensity = props.get("intensity_calibration") or {}
    ds = to_dataset(data, pixel_size=px, title=title,
                    units=str(intensity.get("units") or "counts"), quantity="intensity",
                    frame_time_s=frame_time if layout == "stack" else None, origin_nm=origin,
                    metadata=meta, original_metadata=props)
    ds.source = os.path.abspath(path)
    ds.modality = "STEM"
    return ds


def open(path: str | os.PathLike, *, lazy: bool = True, pixel_size: float | None = None):
    """Open a microscope file as a calibrated ``sidpy.Dataset`` (Nion ``.ndata1`` / ``.h5``).

    Same as :func:`read_nion`; the entry point ``stemgpu.open``.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> import stemgpu
    >>> from stemgpu.io.nion import _write_ndata1_for_doc as write  # test helper
    >>> path = write(os.path.join(tempfile.mkdtemp(), "image.ndata1"), np.ones((8, 8), "f4"))
    >>> stemgpu.open(path).shape
    (8, 8)
    """
    return read_nion(path, lazy=lazy, pixel_size=pixel_size)


def _write_ndata1_for_doc(path: str, data: np.ndarray, pixel_size_nm: float = 0.0146) -> str:
    """Write a minimal Nion ``.ndata1`` (for the docstring examples only)."""
    seq = data.ndim == 3
    props = {
        "type": "data_item", "is_sequence": seq, "collection_dimension_count": 0,
        "datum_dimension_count": 2,
        "dimensional_calibrations": ([{"offset": 0.0, "scale": 1.0, "units": ""}] if seq else [])
        + [{"offset": 0.0, "scale": pixel_size_nm, "units": "nm"}] * 2,
        "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
    }
    import io

    buf = io.BytesIO()
    np.save(buf, data)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.npy", buf.getvalue())
        zf.writestr("metadata.json", json.dumps(props))
    return path
