"""TIFF files exported by Nion Swift: an ImageJ hyperstack with a ``nion.1`` JSON block.

Nion Swift's "TIFF Files (ImageJ)" export (``nionswift-io``) writes the array as an ImageJ
hyperstack (a sequence of images on the ImageJ ``T`` axis) and stores, in the ImageJ
metadata under the key ``nion.1``, a JSON dict with ``spatial_calibrations`` (one
``{"offset", "scale", "units"}`` per array axis), ``intensity_calibration``, the data
descriptor (``is_sequence``, ``collection_dimension_count``, ``datum_dimension_count``),
``properties`` (the item's ``hardware_source`` metadata) and ``timestamp`` (POSIX seconds).
``tifffile`` reads it; an uncompressed file is memory-mapped.

A TIFF without that block is not a Nion file; :func:`stemgpu.open` reads it through
RosettaSciIO instead (:mod:`stemgpu.io.formats`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .lazy import LazyStack

__all__ = ["NION_TAG", "is_tiff", "nion_tiff_properties", "open_tiff"]

NION_TAG = "nion.1"
_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def is_tiff(path: str | os.PathLike) -> bool:
    """True when the file starts with a TIFF signature.

    Examples
    --------
    >>> import os, tempfile
    >>> from stemgpu.io.tiff import is_tiff
    >>> path = os.path.join(tempfile.mkdtemp(), "x.tif")
    >>> _ = open(path, "wb").write(b"II*\\x00" + bytes(8))
    >>> is_tiff(path)
    True
    """
    with open(path, "rb") as fh:
        return fh.read(4) in _MAGIC


def _tifffile(path):
    try:
        import tifffile
    except ImportError:
        raise ImportError(f"{os.fspath(path)!r}: reading TIFF files needs tifffile: "
                          "pip install 'stemgpu[formats]'") from None
    return tifffile


def nion_tiff_properties(path: str | os.PathLike) -> tuple[dict | None, tuple, np.dtype]:
    """The ``nion.1`` dict of a TIFF (None when absent), the series' shape and dtype.

    Raises
    ------
    ValueError
        If the ``nion.1`` block is not a JSON dict.
    tifffile.TiffFileError
        If the file is not a readable TIFF.

    Examples
    --------
    >>> import json, os, tempfile, numpy as np, tifffile
    >>> from stemgpu.io.tiff import nion_tiff_properties
    >>> path = os.path.join(tempfile.mkdtemp(), "image.tif")
    >>> block = {"spatial_calibrations": [{"offset": 0, "scale": 0.0146, "units": "nm"}] * 2}
    >>> tifffile.imwrite(path, np.zeros((4, 6), "f4"), imagej=True,
    ...                  metadata={"unit": "nm", "nion.1": json.dumps(block)})
    >>> props, shape, dtype = nion_tiff_properties(path)
    >>> props["spatial_calibrations"][0]["scale"], shape, dtype.name
    (0.0146, (4, 6), 'float32')
    """
    tifffile = _tifffile(path)
    with tifffile.TiffFile(os.fspath(path)) as tf:
        series = tf.series[0]
        shape, dtype = tuple(int(s) for s in series.shape), np.dtype(series.dtype)
        meta = (tf.imagej_metadata or {}) if tf.is_imagej else {}
    raw = meta.get(NION_TAG)
    if raw is None:
        return None, shape, dtype
    try:
        props = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the ImageJ metadata's {NION_TAG!r} block is not valid JSON "
                         f"({exc})") from None
    if not isinstance(props, dict):
        raise ValueError(f"the ImageJ metadata's {NION_TAG!r} block is not a dict")
    return props, shape, dtype


def open_tiff(path: str | os.PathLike, **kwargs) -> LazyStack:
    """The first series of a TIFF as a :class:`~stemgpu.io.lazy.LazyStack`.

    Memory-mapped (kind ``"memmap"``) when the series is stored uncompressed and contiguous,
    as tifffile and Nion Swift write it; otherwise decoded into memory once (kind
    ``"tiff-decoded"``). ``kwargs`` go to :class:`LazyStack` (``pixel_size_pm``, ...).

    Examples
    --------
    >>> import os, tempfile, numpy as np, tifffile
    >>> from stemgpu.io.tiff import open_tiff
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.tif")
    >>> tifffile.imwrite(path, np.arange(24, dtype="f4").reshape(2, 3, 4), imagej=True)
    >>> src = open_tiff(path)
    >>> src.shape, src.kind, float(src[1, 2, 3])
    ((2, 3, 4), 'memmap', 23.0)
    """
    tifffile = _tifffile(path)
    path = os.fspath(path)
    try:
        array = tifffile.memmap(path, mode="r")
        kind = "memmap"
    except ValueError:  # compressed or not contiguous: decode once
        array = tifffile.imread(path)
        kind = "tiff-decoded"
    return LazyStack.from_array(path, array, kind=kind, **kwargs)
