"""Other microscopes' files through RosettaSciIO (``pip install 'stemgpu[formats]'``).

RosettaSciIO (``rsciio``, the HyperSpy project's reader library) reads Gatan DigitalMicrograph
``.dm3`` / ``.dm4``, EMD (Thermo Fisher Velox and Berkeley/NCEM) ``.emd``, Thermo Fisher TIA
``.ser``, HyperSpy ``.hspy`` and TIFF. :func:`read_file` turns the first image or image stack in
such a file into the same calibrated ``sidpy.Dataset`` a Nion file gives (see
:func:`stemgpu.io.nion.read_nion`): ``(frame, y, x)`` or ``(y, x)``, y/x SPATIAL in nm from the
file's pixel size and origin, the frame axis TEMPORAL (seconds when the file calibrates it),
``metadata`` with ``pixel_size_pm``, ``created``, ``frame_time_s``, ... and the provenance record
``source``, and ``original_metadata`` holding RosettaSciIO's ``metadata`` and
``original_metadata`` dicts. ``stemgpu.open`` and ``stemgpu.open_frames`` call it for every file
that is not a Nion Swift file.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from .._checks import check_real
from .._inputs import length_to_pm
from .lazy import LazyStack

__all__ = ["EXTENSIONS", "FormatError", "open_frames", "read_file"]

# extension -> (rsciio plugin module, what users call the format)
EXTENSIONS = {
    ".dm3": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".dm4": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".emd": ("emd", "EMD (Velox or Berkeley)"),
    ".ser": ("tia", "Thermo Fisher TIA"),
    ".emi": ("tia", "Thermo Fisher TIA"),
    ".hspy": ("hspy", "HyperSpy"),
    ".tif": ("tiff", "TIFF"),
    ".tiff": ("tiff", "TIFF"),
}
_MAX_PIXEL_PM = 1e9  # 1 mm: no microscope image has larger pixels
_TIME_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0}


class FormatError(ValueError):
    """A file RosettaSciIO cannot read, or one holding no image (the message names the file)."""


def _fail(path: str, why: str) -> FormatError:
    return FormatError(f"{path!r}: {why}")


def _plugin(path: str):
    ext = os.path.splitext(path.lower())[1]
    if ext not in EXTENSIONS:
        raise _fail(path, f"not a format stemgpu reads (Nion Swift files, or through "
                          f"RosettaSciIO: {', '.join(sorted(EXTENSIONS))})")
    name, label = EXTENSIONS[ext]
    try:
        importlib.import_module("rsciio")
    except ImportError:
        raise ImportError(f"{path!r}: reading {label} files ({ext}) needs RosettaSciIO: "
                          "pip install 'stemgpu[formats]'") from None
    try:
        return importlib.import_module(f"rsciio.{name}"), label
    except ImportError as exc:  # a plugin's own dependency (h5py, tifffile, ...)
        raise ImportError(f"{path!r}: RosettaSciIO's {name} reader needs {exc.name}: "
                          "pip install 'stemgpu[formats]'") from None


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _length_pm(value: float, units: Any) -> float | None:
    try:
        return length_to_pm(value, str(units)) if units else None
    except ValueError:
        return None


def _is_image(signal: dict, calibrated: bool) -> bool:
    axes = signal.get("axes") or []
    ndim = len(getattr(signal.get("data"), "shape", ()))
    if ndim not in (2, 3) or len(axes) != ndim:
        return False
    dtype = np.dtype(getattr(signal["data"], "dtype", "O"))
    return dtype.kind in "iuf" and (not calibrated
                                    or all(_axis(a)[2] is not None for a in axes[-2:]))


def _axis(axis: dict) -> tuple[float, float, float | None]:
    """(scale, offset, pixel size in pm or None) of one rsciio axis dict."""
    scale, offset = _number(axis.get("scale", 1.0)), _number(axis.get("offset", 0.0))
    scale = 1.0 if scale is None else scale
    offset = 0.0 if offset is None else offset
    size = _length_pm(abs(scale), axis.get("units")) if scale else None
    return scale, offset, size


def _origin_nm(axis: dict, tia: bool) -> float:
    """The axis origin in nm (0 when it has none or no length unit)."""
    offset = _number(axis.get("offset", 0.0)) or 0.0
    scale = abs(_number(axis.get("scale", 0.0)) or 0.0)
    if tia and str(axis.get("units")) == "nm" and 0 < abs(offset) < 1e-3 * scale:
        # RosettaSciIO's TIA reader (0.15) converts the scale from metres to nm but leaves
        # the offset in metres: an origin a thousandth of a pixel from 0 "in nm" is metres.
        # Once the reader converts both, the test (against openNCEM's reader) still holds.
        return offset * 1e9
    return (_length_pm(offset, axis.get("units")) or 0.0) / 1000.0


def _created(meta: dict) -> str | None:
    general = meta.get("General") if isinstance(meta.get("General"), dict) else {}
    date, time = general.get("date"), general.get("time")
    if not isinstance(date, str):
        return None
    return f"{date}T{time}" if isinstance(time, str) else date


def _find(tree: Any, key: str) -> float | None:
    if isinstance(tree, dict):
        if key in tree and _number(tree[key]) is not None:
            return _number(tree[key])
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _inspect(path: str, lazy: bool, pixel_size: float | None, checksum: bool) -> dict:
    from .provenance import source_record

    module, label = _plugin(path)
    try:
        signals = module.file_reader(path, lazy=lazy)
    except Exception as exc:  # rsciio raises many kinds for a file it cannot parse
        raise _fail(path, f"RosettaSciIO could not read it as a {label} file "
                          f"({type(exc).__name__}: {exc})") from None
    signals = signals if isinstance(signals, list) else [signals]
    images = [i for i, s in enumerate(signals) if _is_image(s, pixel_size is None)]
    if not images:
        found = [(tuple(getattr(s.get("data"), "shape", ())),
                  [a.get("units") for a in s.get("axes") or []]) for s in signals]
        hint = ("; pass pixel_size= (pm per pixel) to read an uncalibrated image"
                if pixel_size is None else "")
        raise _fail(path, f"no image or image stack in this {label} file: stemgpu reads a "
                          "real-valued 2-D image or (frame, y, x) stack with y/x axes in a "
                          f"length unit; found (shape, axis units) {found}{hint}")
    index = images[0]
    signal = signals[index]
    data, axes = signal["data"], signal["axes"]
    (_, _, ypm), (_, _, xpm) = _axis(axes[-2]), _axis(axes[-1])
    if pixel_size is not None:
        px, px_source = check_real(pixel_size, "pixel_size", greater=0), "pixel_size="
    else:
        if abs(ypm - xpm) > 1e-3 * max(ypm, xpm):
            raise _fail(path, f"non-square pixels ({ypm:.6g} pm x {xpm:.6g} pm); stemgpu "
                              "assumes square pixels: pass pixel_size= to override")
        if ypm > _MAX_PIXEL_PM:
            # A TIA .ser read without its .emi carries no units: a diffraction pattern's
            # 1/m calibration then reads as metres.
            raise _fail(path, f"the file's calibration of {ypm:.4g} pm per pixel is not a "
                              "real-space pixel (> 1 mm; a diffraction pattern, whose "
                              "calibration is in 1/length?): stemgpu reads real-space images; "
                              "pass pixel_size= to override")
        px, px_source = ypm, "file"
    tia = module.__name__.split(".")[-1] == "tia"
    origin = tuple(_origin_nm(a, tia) for a in axes[-2:])
    layout = "stack" if data.ndim == 3 else "image"
    meta = signal.get("metadata") if isinstance(signal.get("metadata"), dict) else {}
    frame_time, ft_source = None, None
    if layout == "stack":
        scale, _, _ = _axis(axes[0])
        units = str(axes[0].get("units") or "").strip().lower()
        if units in _TIME_TO_S and scale:
            frame_time, ft_source = abs(scale) * _TIME_TO_S[units], "frame axis calibration"
        elif tia:  # TIA keeps the frame time in the .emi, not on the frame axis
            acquire = ((signal.get("original_metadata") or {}).get("ObjectInfo") or {}) \
                .get("AcquireInfo") or {}
            value = _number(acquire.get("FrameTime")) if isinstance(acquire, dict) else None
            if value and value > 0:
                frame_time, ft_source = value, "TIA ObjectInfo.AcquireInfo.FrameTime"
    general = meta.get("General") if isinstance(meta.get("General"), dict) else {}
    signal_md = meta.get("Signal") if isinstance(meta.get("Signal"), dict) else {}
    out = {
        "pixel_size_pm": px, "pixel_size_source": px_source, "layout": layout,
        "shape": [int(s) for s in data.shape], "created": _created(meta),
        "created_from": "General.date/time" if _created(meta) else None,
        "timezone": general.get("time_zone") if isinstance(general.get("time_zone"), str)
        else None,
        "exposure_s": _find(meta, "exposure"), "frame_time_s": frame_time,
        "frame_time_source": ft_source,
    }
    out = {k: v for k, v in out.items() if v is not None}
    record = source_record(path, f"rsciio-{module.__name__.split('.')[-1]}",
                           "rsciio-lazy" if lazy else "memory", checksum=checksum,
                           signal=index, signals_in_file=len(signals))
    title = general.get("title") if isinstance(general.get("title"), str) else ""
    return {"data": data, "px": px, "origin": origin, "layout": layout,
            "frame_time": frame_time, "meta": {"source": record, **out},
            "original": {"metadata": meta,
                         "original_metadata": signal.get("original_metadata") or {},
                         "axes": [dict(a) for a in axes]},
            "title": title or os.path.splitext(os.path.basename(path))[0],
            "quantity": signal_md.get("quantity") if isinstance(signal_md.get("quantity"),
                                                               str) else None}


def read_file(path: str | os.PathLike, *, lazy: bool = True, pixel_size: float | None = None):
    """Read the first image or image stack of a DM3/DM4, EMD, TIA, HSPY or TIFF file.

    Parameters
    ----------
    path : str or os.PathLike
        The format is chosen by the extension (:data:`EXTENSIONS`).
    lazy : bool
        Let RosettaSciIO read lazily (a dask array) where it can; ``False`` reads everything
        now, and the file's SHA-256 with it.
    pixel_size : float, optional
        Pixel size in pm; overrides (or replaces a missing) file calibration.

    Returns
    -------
    sidpy.Dataset
        As :func:`stemgpu.io.nion.read_nion`; ``metadata["source"]["format"]`` is
        ``"rsciio-<reader>"`` and ``metadata["source"]["signal"]`` the index of the signal
        read among ``signals_in_file``.

    Raises
    ------
    ImportError
        RosettaSciIO (or the reader's own dependency) is not installed; the message names
        the ``formats`` extra.
    FormatError (a ValueError)
        Unknown extension, a file RosettaSciIO cannot parse, no calibrated image in it, or
        non-square pixels.
    ValueError
        ``pixel_size`` is not a finite number > 0.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from rsciio.tiff import file_writer
    >>> from stemgpu.io.formats import read_file
    >>> path = os.path.join(tempfile.mkdtemp(), "image.tif")
    >>> axes = [{"name": n, "size": 8, "scale": 0.0146, "offset": 0.0, "units": "nm",
    ...          "navigate": False} for n in "yx"]
    >>> file_writer(path, {"data": np.ones((8, 8), "f4"), "axes": axes, "metadata": {}})
    >>> ds = read_file(path)
    >>> ds.shape, ds.metadata["pixel_size_pm"], ds.metadata["source"]["format"]
    ((8, 8), 14.6, 'rsciio-tiff')
    """
    from .sidpy_io import to_dataset

    path = os.fspath(path)
    item = _inspect(path, lazy, pixel_size, checksum=not lazy)
    data = item["data"]
    if not lazy:
        data = np.asarray(data)
    ds = to_dataset(data, pixel_size=item["px"], title=item["title"], units="counts",
                    quantity="intensity",
                    frame_time_s=item["frame_time"] if item["layout"] == "stack" else None,
                    origin_nm=item["origin"], metadata=item["meta"],
                    original_metadata=item["original"])
    ds.metadata["source"] = item["meta"]["source"]
    ds.source = os.path.abspath(path)
    ds.modality = "STEM"
    return ds


def open_frames(path: str | os.PathLike, *, pixel_size: float | None = None) -> LazyStack:
    """The first image (stack) of a RosettaSciIO-readable file as a lazy frame source.

    Frames are read on demand where RosettaSciIO reads lazily; see :func:`read_file` for the
    formats, calibration and errors, and :func:`stemgpu.open_frames`.
    """
    path = os.fspath(path)
    item = _inspect(path, True, pixel_size, checksum=False)
    data = item["data"]
    return LazyStack.from_array(path, data, kind=item["meta"]["source"]["storage"],
                                pixel_size_pm=item["px"], metadata=item["meta"],
                                original_metadata=item["original"])
