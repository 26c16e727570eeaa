"""Reading images and image stacks from pyNSID HDF5 files as calibrated ``sidpy.Dataset``.

:func:`read_nsid` loads the first 2-D or 3-D pyNSID main dataset of a file;
:func:`read_nsid_or_raise` is the fallback of a Nion reader that failed on an HDF5 file
(``stemgpu run`` uses it, and so can ``stemgpu.open``). h5py and pyNSID are imported inside
the functions.
"""

from __future__ import annotations

import os

import numpy as np

from .._inputs import pixel_size_from_dataset, resolve_pixel_size
from .sidpy_io import to_dataset

__all__ = ["NSID_SUFFIXES", "read_nsid", "read_nsid_or_raise"]

#: File name endings that may hold a pyNSID dataset.
NSID_SUFFIXES = (".h5", ".hdf5", ".nsid")


def read_nsid(path: str | os.PathLike, *, pixel_size: float | None = None):
    """The first 2-D or 3-D pyNSID main dataset of an HDF5 file, loaded; None if there is none.

    Parameters
    ----------
    path : str or os.PathLike
    pixel_size : float, optional
        Pixel size in pm; overrides the dataset's spatial calibration.

    Returns
    -------
    sidpy.Dataset or None
        ``(frame, y, x)`` or ``(y, x)`` in memory, calibrated in nm (see
        :func:`stemgpu.io.sidpy_io.to_dataset`), with the dataset's title and metadata.
        None when the file is not HDF5 or holds no 2-D or 3-D pyNSID main dataset.

    Raises
    ------
    ValueError
        The dataset's spatial axes have different pixel sizes (and no ``pixel_size``).

    Examples
    --------
    >>> import os, tempfile, warnings, h5py, numpy as np, pyNSID
    >>> from stemgpu.io.nsid import read_nsid
    >>> from stemgpu.io.sidpy_io import pixel_size_from_dataset, to_dataset
    >>> path = os.path.join(tempfile.mkdtemp(), "image.h5")
    >>> with h5py.File(path, "w") as fh, warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     group = fh.create_group("Measurement_000/Channel_000")
    ...     _ = pyNSID.hdf_io.write_nsid_dataset(to_dataset(np.ones((3, 8, 8), "f4"),
    ...                                                     pixel_size=14.6), group)
    >>> ds = read_nsid(path)
    >>> ds.shape, round(pixel_size_from_dataset(ds), 6)
    ((3, 8, 8), 14.6)
    """
    import warnings

    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError:
        return None
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from pyNSID.io.hdf_utils import get_all_main, read_h5py_dataset

            mains = get_all_main(fh)
        except Exception:  # a foreign HDF5 layout: the caller reports it in one line
            return None
        for dset in mains:
            if dset.ndim not in (2, 3):
                continue
            ds = read_h5py_dataset(dset)
            data = np.asarray(ds)
            px = resolve_pixel_size(pixel_size, None)
            if px is None:
                px = pixel_size_from_dataset(ds)
            return to_dataset(data, pixel_size=px, title=str(getattr(ds, "title", "") or "data"),
                              metadata=dict(getattr(ds, "metadata", {}) or {}))
    return None


def read_nsid_or_raise(path: str | os.PathLike, nion_error: Exception, *,
                       pixel_size: float | None = None):
    """Read ``path`` as pyNSID after a Nion reader refused it with ``nion_error``.

    Call it inside the ``except`` block of the Nion reader: ``nion_error`` is raised again
    for a file whose name does not end in :data:`NSID_SUFFIXES` or that holds no pyNSID image
    either.

    Examples
    --------
    >>> from stemgpu.io.nsid import read_nsid_or_raise
    >>> read_nsid_or_raise("stack.tif", ValueError("'stack.tif': not a Nion file"))
    Traceback (most recent call last):
    ...
    ValueError: 'stack.tif': not a Nion file
    """
    if not os.fspath(path).lower().endswith(NSID_SUFFIXES):
        raise nion_error
    dataset = read_nsid(path, pixel_size=pixel_size)
    if dataset is None:
        # No pyNSID image either: the Nion reader's reason (e.g. an item caught mid-write)
        # is the one that helps, and it says which file.
        raise nion_error
    return dataset
