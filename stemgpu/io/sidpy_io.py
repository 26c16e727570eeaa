"""Adapters between arrays (NumPy, CuPy, lazy sources) and ``sidpy.Dataset``.

Datasets made here follow one convention: a stack is ``(frame, y, x)`` with the frame axis
``TEMPORAL`` (seconds when the frame time is known, else frame index) and ``y``/``x``
``SPATIAL`` in nm; a single image is ``(y, x)``. Reading the calibration back goes through
:func:`stemgpu._inputs.pixel_size_from_dataset`, the same code every public function uses.
sidpy is imported inside the functions, never at module import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_real
from .._inputs import Calibrated, as_image, is_sidpy_dataset, pixel_size_from_dataset
from ..backend import is_cupy_array

__all__ = ["from_dataset", "image_axes", "pixel_size_from_dataset", "to_dataset"]


def image_axes(shape, pixel_size_pm: float | None = None, frame_time_s: float | None = None,
               origin_nm: tuple[float, float] = (0.0, 0.0)) -> list[tuple]:
    """``(name, values, units, quantity, dimension_type)`` per axis of an image or stack.

    The one home of the convention (see the module docstring): :func:`to_dataset` makes
    its ``sidpy.Dimension`` objects from it, and the results file writes them with h5py
    alone (``stemgpu.io._tree``, without importing sidpy).
    """
    axes = []
    if len(shape) == 3:
        if frame_time_s is not None:
            axes.append(("frame", np.arange(shape[0]) * frame_time_s, "s", "time", "TEMPORAL"))
        else:
            axes.append(("frame", np.arange(shape[0], dtype=float), "frame", "time",
                         "TEMPORAL"))
    for name, n, offset in (("y", shape[-2], origin_nm[0]), ("x", shape[-1], origin_nm[1])):
        if pixel_size_pm is None:
            axes.append((name, np.arange(n, dtype=float), "pixel", "distance", "SPATIAL"))
        else:  # float64: n * scale must stay exact to well below a pm over thousands of pixels
            values = offset + np.arange(n, dtype=np.float64) * (pixel_size_pm / 1000.0)
            axes.append((name, values, "nm", "distance", "SPATIAL"))
    return axes


def to_dataset(array: Any, *, pixel_size: float | None = None, title: str = "stack",
               units: str = "counts", quantity: str = "intensity",
               frame_time_s: float | None = None, origin_nm: tuple[float, float] = (0.0, 0.0),
               metadata: dict | None = None, original_metadata: dict | None = None,
               chunks: Any = None):
    """Wrap a 2-D image or a 3-D (frame, row, col) stack as a calibrated ``sidpy.Dataset``.

    Parameters
    ----------
    array : NumPy array, CuPy array, dask array or lazy frame source
        CuPy arrays are copied to the host once (sidpy holds host memory). A lazy source
        (``stemgpu.io.lazy.LazyStack``) or a dask array stays lazy.
    pixel_size : float, optional
        Pixel size in pm; the spatial axes are written in nm. Without it they are in pixels.
    title, units, quantity : str
        Dataset title and the intensity's units and quantity.
    frame_time_s : float, optional
        Time between frames; the frame axis is then in seconds, else a frame index.
    origin_nm : (y, x)
        Position of pixel (0, 0) in nm.
    metadata, original_metadata : dict, optional
        Stored on the Dataset.
    chunks : optional
        Dask chunks (default: whole frames, ~64 MB per chunk for lazy sources).

    Returns
    -------
    sidpy.Dataset

    Raises
    ------
    ValueError
        If ``array`` is not 2-D or 3-D, or ``pixel_size``/``frame_time_s`` is not a finite
        number > 0.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.io.sidpy_io import to_dataset, from_dataset
    >>> ds = to_dataset(np.zeros((3, 8, 8), "f4"), pixel_size=14.6)
    >>> [ds._axes[i].dimension_type.name for i in range(3)]
    ['TEMPORAL', 'SPATIAL', 'SPATIAL']
    >>> ds._axes[2].units, float(ds._axes[2].values[1])
    ('nm', 0.0146)
    >>> from_dataset(ds).pixel_size_pm
    14.6
    """
    import dask.array as da
    import sidpy

    ndim = len(getattr(array, "shape", ()))
    if ndim not in (2, 3):
        raise ValueError(
            f"array must be a 2-D image or a 3-D (frame, row, col) stack; got shape "
            f"{tuple(getattr(array, 'shape', ()))}")
    if pixel_size is not None:
        pixel_size = check_real(pixel_size, "pixel_size", greater=0)
    if frame_time_s is not None:
        frame_time_s = check_real(frame_time_s, "frame_time_s", greater=0)

    if isinstance(array, da.Array):
        data = array
    elif is_cupy_array(array):
        data = da.from_array(array.get(), chunks=chunks or "auto")
    elif isinstance(array, np.ndarray):
        data = da.from_array(array, chunks=chunks or "auto")
    elif hasattr(array, "to_dask"):
        data = array.to_dask()
    else:
        data = da.from_array(array, chunks=chunks or "auto", asarray=True, fancy=False)

    ds = sidpy.Dataset.from_array(data, title=title)
    ds.units = units
    ds.quantity = quantity
    ds.data_type = "IMAGE_STACK" if ndim == 3 else "IMAGE"
    shape = tuple(int(s) for s in data.shape)
    for axis, (name, values, units_, quantity_, kind) in enumerate(
            image_axes(shape, pixel_size, frame_time_s, origin_nm)):
        ds.set_dimension(axis, sidpy.Dimension(values, name=name, units=units_,
                                               quantity=quantity_, dimension_type=kind))
    ds.metadata = dict(metadata or {})
    ds.original_metadata = dict(original_metadata or {})
    return ds


def from_dataset(dataset: Any, *, backend: Any = None) -> Calibrated:
    """The array of a ``sidpy.Dataset`` on a backend, with its pixel size in pm.

    Parameters
    ----------
    dataset : sidpy.Dataset
        A 2-D image or 3-D stack; the pixel size is read from its SPATIAL axes.
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    stemgpu._inputs.Calibrated
        ``data`` (float32 unless float64), ``backend``, ``pixel_size_pm`` (None when the
        spatial axes are uncalibrated) and ``metadata``.

    Raises
    ------
    TypeError
        If ``dataset`` is not a sidpy Dataset.
    ValueError
        Not 2-D/3-D, NaN/inf pixels, or spatial axes with different pixel sizes.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.io.sidpy_io import to_dataset, from_dataset
    >>> cal = from_dataset(to_dataset(np.ones((4, 4), "f4"), pixel_size=20.0))
    >>> cal.data.shape, cal.pixel_size_pm
    ((4, 4), 20.0)
    """
    if not is_sidpy_dataset(dataset):
        raise TypeError(f"dataset must be a sidpy.Dataset; got {type(dataset).__name__}")
    return as_image(dataset, name="dataset", backend=backend, allow_stack=True)
