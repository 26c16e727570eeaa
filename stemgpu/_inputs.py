"""Input handling shared by every public function: arrays, sidpy Datasets and calibration.

Public functions call :func:`as_stack` / :func:`as_image` once at their boundary. These accept
NumPy arrays, CuPy arrays and ``sidpy.Dataset`` objects (detected without importing sidpy),
convert integer data to float32, reject NaN/inf pixels with an error naming the frames, and
return the array on the resolved backend together with the pixel size (pm) when the input
carried one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend, is_cupy_array, resolve_backend, to_host

__all__ = [
    "Calibrated",
    "as_image",
    "as_stack",
    "is_frame_source",
    "is_sidpy_dataset",
    "length_to_pm",
    "pixel_size_from_dataset",
    "resolve_pixel_size",
]

_UNIT_TO_PM = {
    "pm": 1.0,
    "a": 100.0,
    "å": 100.0,
    "angstrom": 100.0,
    "ang": 100.0,
    "nm": 1000.0,
    "µm": 1e6,
    "um": 1e6,
    "micron": 1e6,
    "mm": 1e9,
    "m": 1e12,
}


#: Pixel sizes accepted, pm: 1e-6 pm to 1 mm, far beyond any electron microscope either way.
_MIN_PIXEL_PM, _MAX_PIXEL_PM = 1e-6, 1e9


@dataclass(frozen=True)
class Calibrated:
    """An input converted for computation.

    Attributes
    ----------
    data : array on the chosen backend (float32 unless float64 was given)
    backend : Backend
    pixel_size_pm : float or None
        From the sidpy Dataset's spatial dimensions or the ``pixel_size=`` keyword.
    metadata : dict
        The Dataset's original metadata (empty for plain arrays).
    """

    data: Any
    backend: Backend
    pixel_size_pm: float | None
    metadata: dict


def is_sidpy_dataset(obj: Any) -> bool:
    """True for a ``sidpy.Dataset`` (decided without importing sidpy)."""
    return any(c.__module__.startswith("sidpy") and c.__name__ == "Dataset"
               for c in type(obj).__mro__)


def is_frame_source(obj: Any, *, memmap: bool = True) -> bool:
    """True for a lazy stack read frame by frame from disk (LazyStack, h5py dataset, memmap).

    The one "is this a lazy array?" rule of the package: anything with ``shape``, ``dtype``
    and ``__getitem__`` that is not in memory. NumPy/CuPy arrays and scalars, sidpy Datasets,
    strings, mappings, lists and tuples are in-memory data, not frame sources.

    Parameters
    ----------
    obj : object
    memmap : bool
        Whether a ``numpy.memmap`` counts: True for the stages, which stream it batch by
        batch; the results writer passes False and stores it as the NumPy array it is.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu._inputs import is_frame_source
    >>> is_frame_source(np.zeros((3, 4, 4))), is_frame_source(np.float32(1.0))
    (False, False)
    """
    if isinstance(obj, np.memmap):
        return memmap
    if (isinstance(obj, np.ndarray | np.generic | str | bytes | Mapping | list | tuple)
            or is_cupy_array(obj) or is_sidpy_dataset(obj)):
        return False
    return all(hasattr(obj, a) for a in ("shape", "dtype", "__getitem__"))


def length_to_pm(value: float, unit: str) -> float:
    """Convert a length in ``unit`` (pm, Å, nm, µm, mm, m) to picometres.

    Examples
    --------
    >>> from stemgpu._inputs import length_to_pm
    >>> length_to_pm(0.0146, "nm")
    14.6
    """
    key = str(unit).strip().lower()
    if key not in _UNIT_TO_PM:
        raise ValueError(
            f"unit={unit!r} is not a length unit stemgpu understands; accepted: "
            + ", ".join(sorted(_UNIT_TO_PM))
        )
    return round(float(value) * _UNIT_TO_PM[key], 12)


def pixel_size_from_dataset(dataset: Any) -> float | None:
    """Pixel size in pm from a sidpy Dataset's spatial dimensions (None if uncalibrated).

    Raises ``ValueError`` when the two spatial axes have different pixel sizes (more than
    0.1 %), since every stemgpu algorithm assumes square pixels.
    """
    sizes = []
    for axis in getattr(dataset, "_axes", {}).values():
        if str(getattr(axis, "dimension_type", "")).upper().endswith("SPATIAL"):
            values = np.asarray(axis.values, dtype=float)
            units = str(getattr(axis, "units", "") or "")
            if len(values) < 2 or not units or units.lower() in ("pixel", "pixels", "px"):
                continue
            try:
                sizes.append(length_to_pm(abs(values[1] - values[0]), units))
            except ValueError:
                continue
    if not sizes:
        return None
    if len(sizes) == 2 and abs(sizes[0] - sizes[1]) > 1e-3 * max(sizes):
        raise ValueError(
            f"the dataset's spatial axes have different pixel sizes ({sizes[0]:.4g} pm and "
            f"{sizes[1]:.4g} pm); resample to square pixels first"
        )
    return float(sizes[0])


def resolve_pixel_size(pixel_size: float | None, from_data: float | None,
                       *, required: bool = False, what: str = "this result") -> float | None:
    """Pick the pixel size (pm): the keyword wins over the data's calibration.

    Raises ``ValueError`` when ``required`` and neither is known, or when the keyword is not
    a positive finite number.
    """
    if pixel_size is not None:
        # float() would take "14.6" (and NumPy a 1-element array): only numbers are pixel sizes
        if (isinstance(pixel_size, bool | str | bytes | list | tuple)
                or getattr(pixel_size, "ndim", 0) != 0):
            raise ValueError(f"pixel_size must be a positive number in pm; got {pixel_size!r}")
        try:
            value = float(pixel_size)
        except (TypeError, ValueError):
            raise ValueError(f"pixel_size must be a number in pm; got {pixel_size!r}") from None
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"pixel_size must be a positive number in pm; got {pixel_size!r}")
        if not _MIN_PIXEL_PM <= value <= _MAX_PIXEL_PM:  # squares of lengths in pm must
            # neither overflow nor underflow to a jitter of exactly 0
            raise ValueError(f"pixel_size must be a positive number in pm, from "
                             f"{_MIN_PIXEL_PM:g} to {_MAX_PIXEL_PM:g} (1 mm); got {pixel_size!r}")
        return value
    if from_data is None and required:
        raise ValueError(
            f"{what} needs a calibration: pass pixel_size= (pm per pixel) or a sidpy Dataset "
            "with calibrated spatial dimensions"
        )
    return from_data


def _unwrap(data: Any, name: str) -> tuple[Any, float | None, dict]:
    if is_sidpy_dataset(data):
        meta = dict(getattr(data, "original_metadata", {}) or {})
        meta.update(dict(getattr(data, "metadata", {}) or {}))
        return np.asarray(data.compute()), pixel_size_from_dataset(data), meta
    if is_cupy_array(data) or isinstance(data, np.ndarray):
        return data, None, {}
    if hasattr(data, "__array__") or isinstance(data, list | tuple):
        return np.asarray(data), None, {}
    raise TypeError(
        f"{name} must be a NumPy array, a CuPy array or a sidpy.Dataset; got {type(data).__name__}"
    )


def _to_float(array: Any, name: str) -> Any:
    kind = array.dtype.kind
    if kind in "iub":
        return array.astype("float32")
    if kind == "f":
        return array if array.dtype.itemsize >= 4 else array.astype("float32")
    raise TypeError(
        f"{name} must hold real numbers (integer or float pixels); got dtype {array.dtype}"
    )


def _check_finite(xp, array: Any, name: str) -> None:
    bad = ~xp.isfinite(array)
    if array.ndim == 3:
        per_frame = bad.reshape(array.shape[0], -1).any(axis=1)
        if bool(per_frame.any()):
            frames = np.flatnonzero(to_host(per_frame))
            shown = ", ".join(str(i) for i in frames[:20]) + (" ..." if len(frames) > 20 else "")
            raise ValueError(
                f"{name} has NaN or infinite pixels in frame(s) {shown}; "
                "replace or drop those frames first"
            )
    elif bool(bad.any()):
        raise ValueError(f"{name} has NaN or infinite pixels; replace them first")


def as_stack(data: Any, *, name: str = "stack", min_frames: int = 2,
             backend: str | Backend | None = None, pixel_size: float | None = None) -> Calibrated:
    """Validate a (frames, rows, cols) stack and move it to the backend.

    Raises
    ------
    ValueError
        Not 3-D, fewer than ``min_frames`` frames, frames smaller than 2 x 2, NaN/inf pixels
        (naming the frames).
    TypeError
        Unsupported container or dtype.
    """
    array, px, meta = _unwrap(data, name)
    if isinstance(array, list | tuple):  # a list of frames of different shapes
        array = np.asarray(array)
    if array.dtype == object:
        raise ValueError(f"{name} frames must all have the same shape")
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-D stack (frames, rows, cols); got an array of shape "
            f"{tuple(array.shape)}"
            + (" — for a single image use a stack of shape (1, rows, cols) or the image API"
               if array.ndim == 2 else "")
        )
    if array.shape[0] < min_frames:
        raise ValueError(f"{name} must have at least {min_frames} frames; got {array.shape[0]}")
    if array.shape[1] < 2 or array.shape[2] < 2:
        raise ValueError(f"{name} frames must be at least 2 x 2 pixels; got {array.shape[1:]}")
    be = resolve_backend(backend, array)
    out = be.asarray(_to_float(array, name))
    _check_finite(be.xp, out, name)
    return Calibrated(out, be, resolve_pixel_size(pixel_size, px), meta)


def as_image(data: Any, *, name: str = "image", backend: str | Backend | None = None,
             pixel_size: float | None = None, allow_stack: bool = False) -> Calibrated:
    """Validate a 2-D image (or, with ``allow_stack``, a 3-D stack) and move it to the backend."""
    array, px, meta = _unwrap(data, name)
    ndims = (2, 3) if allow_stack else (2,)
    if array.ndim not in ndims:
        accepted = "a 2-D image or a 3-D stack" if allow_stack else "a 2-D image (rows, cols)"
        raise ValueError(f"{name} must be {accepted}; got an array of shape {tuple(array.shape)}")
    if min(array.shape[-2:]) < 2:
        raise ValueError(f"{name} must be at least 2 x 2 pixels; got {tuple(array.shape)}")
    be = resolve_backend(backend, array)
    out = be.asarray(_to_float(array, name))
    _check_finite(be.xp, out, name)
    return Calibrated(out, be, resolve_pixel_size(pixel_size, px), meta)
