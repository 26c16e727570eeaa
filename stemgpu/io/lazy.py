"""Lazy frame sources: stacks read from disk in frame batches, never loaded whole.

A :class:`LazyStack` exposes ``.shape``, ``.dtype``, ``len()``, NumPy-style indexing over
frames (returning NumPy arrays) and :meth:`LazyStack.iter_batches`. It is what
``stemgpu.register_rigid`` and friends stream from. The storage kinds:

- an uncompressed (``ZIP_STORED``) ``.npy`` member of a zip file, as Nion Swift writes its
  ``.ndata`` library items and ``.ndata1`` exports: memory-mapped at the member's data offset
  (no copy until indexed);
- a compressed zip member: read (decompressed) once on first access, then served from memory;
- an HDF5 dataset (h5py), opened read-only without the HDF5 file lock (Nion Swift keeps the
  ``.h5`` items of an open project open for writing) and sliced per request;
- any array-like (a memory map, a dask array from RosettaSciIO, ...) via :meth:`from_array`.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from typing import Any

import numpy as np

from .._checks import check_int
from .._progress import progress_bar

__all__ = ["LazyStack", "npy_member_layout", "open_hdf5"]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes


def npy_member_layout(path: str | os.PathLike, member: str = "data.npy"):
    """Locate a ``.npy`` member inside a zip file.

    Returns
    -------
    offset : int or None
        Absolute file offset of the array data (None when the member is compressed).
    shape : tuple of int
    dtype : numpy.dtype
    fortran_order : bool

    Raises
    ------
    KeyError
        If ``member`` is not in the archive.
    zipfile.BadZipFile
        For a truncated or corrupt archive.
    ValueError
        If the member is not a valid ``.npy`` file.
    """
    with zipfile.ZipFile(path, "r") as zf:
        info = zf.getinfo(member)
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            header_len = fh.tell()
    if info.compress_type != zipfile.ZIP_STORED:
        return None, tuple(shape), np.dtype(dtype), bool(fortran)
    # The local header can carry a different extra field from the central directory, so
    # read its own lengths to find where the member's bytes start.
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {member!r} in {os.fspath(path)!r}")
    name_len, extra_len = fields[9], fields[10]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    offset = start + header_len
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if offset + nbytes > os.path.getsize(path):
        raise zipfile.BadZipFile(f"{os.fspath(path)!r}: {member!r} is truncated")
    return offset, tuple(shape), np.dtype(dtype), bool(fortran)


def open_hdf5(path: str | os.PathLike):
    """Open an HDF5 file read-only without the HDF5 file lock (an ``h5py.File``).

    Nion Swift keeps the ``.h5`` items of an open project open in append mode, holding the
    lock, so a locking reader would be refused. When this process itself already has the
    file open with locking (HDF5 then refuses a second open with other locking flags), the
    file is opened with the default flags instead, which shares the open file.

    Raises
    ------
    OSError
        As ``h5py.File`` (missing, truncated or corrupt file).

    Examples
    --------
    >>> import os, tempfile, h5py
    >>> from stemgpu.io.lazy import open_hdf5
    >>> path = os.path.join(tempfile.mkdtemp(), "item.h5")
    >>> with h5py.File(path, "w") as fh:
    ...     fh["data"] = [1.0, 2.0]
    >>> with h5py.File(path, "a") as writer, open_hdf5(path) as reader:
    ...     reader["data"][1]
    np.float64(2.0)
    """
    import h5py

    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "locking flag values don't match" not in str(exc):
            raise
        return h5py.File(path, "r")


class LazyStack:
    """A (frames, rows, cols) stack (or any N-d array) read from disk on demand.

    Use :meth:`from_zip_npy` or :meth:`from_hdf5` to build one (``stemgpu.open`` does this
    for Nion files). Indexing returns NumPy arrays; ``np.asarray(stack)`` loads everything.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
    path : str
        The file read.
    kind : str
        ``"memmap"``, ``"zip-compressed"``, ``"hdf5"``, or what :meth:`from_array` was given.
    pixel_size_pm : float or None
        Calibration carried along for the functions that stream from this source.
    metadata : dict
        Free-form metadata (e.g. the reader's normalised calibration; ``metadata["source"]``
        is the provenance record of :func:`stemgpu.io.provenance.source_of`).
    original_metadata : dict
        The file's own metadata, as read (empty when the constructor was given none).

    Examples
    --------
    >>> import os, tempfile, numpy as np, h5py
    >>> from stemgpu.io.lazy import LazyStack
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("data", data=np.arange(24, dtype="f4").reshape(6, 2, 2))
    >>> src = LazyStack.from_hdf5(path, "data")
    >>> src.shape, len(src), src.dtype.name
    ((6, 2, 2), 6, 'float32')
    >>> [b.shape[0] for b in src.iter_batches(4)]
    [4, 2]
    >>> float(src[5, 1, 1])
    23.0
    >>> src.close()
    """

    def __init__(self, path, shape, dtype, *, kind, reader, pixel_size_pm=None, metadata=None,
                 original_metadata=None, closer=None):
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.kind = kind
        self._read = reader  # callable(frame slice) -> ndarray
        self._closer = closer
        self.pixel_size_pm = pixel_size_pm
        self.metadata = dict(metadata or {})
        self.original_metadata = dict(original_metadata or {})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_zip_npy(cls, path, member: str = "data.npy", **kwargs) -> LazyStack:
        """Frames of a ``.npy`` member of a zip: memory-mapped when stored uncompressed."""
        offset, shape, dtype, fortran = npy_member_layout(path, member)
        if offset is not None and int(np.prod(shape)) > 0:
            mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                           order="F" if fortran else "C")
            return cls(path, shape, dtype, kind="memmap", reader=lambda key: mm[key], **kwargs)
        lock = threading.Lock()
        cache: dict[str, np.ndarray] = {}

        def read(key):
            with lock:  # dask may call from several threads; decompress only once
                if "a" not in cache:
                    with zipfile.ZipFile(path, "r") as zf, zf.open(member) as fh:
                        cache["a"] = np.lib.format.read_array(fh)
            return cache["a"][key]

        return cls(path, shape, dtype, kind="zip-compressed", reader=read, **kwargs)

    @classmethod
    def from_hdf5(cls, path, dataset: str = "data", **kwargs) -> LazyStack:
        """Frames of an HDF5 dataset, opened read-only (never in append mode).

        The file is opened without the HDF5 file lock, so a file another process holds open
        for writing (Nion Swift, during and after an acquisition) can be read.
        """
        import h5py

        fh = open_hdf5(path)
        try:
            dset = fh[dataset]
            if not isinstance(dset, h5py.Dataset):
                raise KeyError(dataset)
            shape, dtype = dset.shape, dset.dtype
        except Exception:
            fh.close()
            raise
        return cls(path, shape, dtype, kind="hdf5", reader=lambda key: dset[key],
                   closer=fh.close, **kwargs)

    @classmethod
    def from_array(cls, path, array, *, kind: str, **kwargs) -> LazyStack:
        """Frames of an array-like already opened on ``path`` (memmap, dask array, ...).

        Indexing slices ``array`` and converts the result to NumPy, so a dask array is
        computed one request at a time.

        Examples
        --------
        >>> import numpy as np
        >>> from stemgpu.io.lazy import LazyStack
        >>> src = LazyStack.from_array("frames.npy", np.arange(8.0).reshape(2, 2, 2),
        ...                            kind="memory")
        >>> src.shape, src.kind, src[1].tolist()
        ((2, 2, 2), 'memory', [[4.0, 5.0], [6.0, 7.0]])
        """
        def read(key):
            if isinstance(key, list):  # dask and memmaps index with arrays, not lists
                key = np.asarray(key, dtype=np.intp)
            return np.asarray(array[key])

        return cls(path, array.shape, array.dtype, kind=kind, reader=read, **kwargs)

    # ------------------------------------------------------------------ array protocol
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if first is Ellipsis or first is None:  # rare forms: let NumPy interpret them
            return np.asarray(self)[key]
        if isinstance(first, int | np.integer):
            frames = np.array(self._read(int(first)))  # copy: a memmap view must not escape
            return frames[rest] if rest else frames
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            if step > 0:
                frames = np.array(self._read(slice(start, stop, step)))
            else:  # h5py cannot step backwards: read forwards, then reverse
                idx = np.arange(start, stop, step)
                frames = (np.array(self._read(slice(idx[-1], idx[0] + 1, -step)))[::-1]
                          if len(idx) else np.empty((0, *self.shape[1:]), self.dtype))
        else:  # list / integer or boolean array of frames: read sorted unique frames once
            idx = np.arange(self.shape[0])[np.asarray(first)]
            uniq, inverse = np.unique(idx, return_inverse=True)
            frames = np.array(self._read(list(uniq) if self.kind == "hdf5" else uniq))
            frames = frames[inverse.reshape(idx.shape)]
            if idx.ndim != 1:
                return frames[(Ellipsis, *rest)] if rest else frames
        return frames[(slice(None), *rest)] if rest else frames

    def __array__(self, dtype=None, copy=None):
        out = np.array(self._read(slice(None)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def iter_batches(self, batch_size: int, *, progress: bool = False):
        """Yield consecutive NumPy batches of at most ``batch_size`` frames.

        Raises
        ------
        ValueError
            If ``batch_size`` is not an integer >= 1.
        """
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        starts = range(0, self.shape[0], batch_size)
        bar = progress_bar(progress, total=len(starts), desc="read", unit="batch")
        try:
            for start in starts:
                yield self[start:start + batch_size]
                bar.update(1)
        finally:
            bar.close()

    def to_dask(self, batch_size: int | None = None):
        """A dask array over this source, chunked by ``batch_size`` frames (default ~64 MB)."""
        import dask.array as da

        frame_bytes = max(1, self.nbytes // max(1, self.shape[0]))
        b = batch_size or max(1, min(self.shape[0], (64 << 20) // frame_bytes))
        chunks = (b, *self.shape[1:])
        # meta= stops dask from probing the source with a 0-size read
        return da.from_array(self, chunks=chunks, asarray=True, lock=self.kind == "hdf5",
                             fancy=False, meta=np.empty((0,) * self.ndim, self.dtype))

    def close(self) -> None:
        """Close the underlying file (HDF5); memory maps close when garbage-collected."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"LazyStack(shape={self.shape}, dtype={self.dtype.name}, kind={self.kind!r}, "
                f"path={self.path!r})")
