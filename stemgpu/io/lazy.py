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

import copy
import mmap
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
                 original_metadata=None, closer=None, ref=None):
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.kind = kind
        self._read = reader  # callable(frame key) -> ndarray; None until (re)opened
        self._closer = closer
        # How to reopen the file in another process (see __reduce__); None: not a file kind
        self._ref = ref
        self._start = 0  # first frame of the file's frame axis (frame_range views)
        self._nfile = self.shape[0] if self.shape else 0  # frames in the file
        self._array = None  # from_array's array, pickled as such when there is no ref
        self._open_lock = threading.Lock()
        self.pixel_size_pm = pixel_size_pm
        self.metadata = dict(metadata or {})
        self.original_metadata = dict(original_metadata or {})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_zip_npy(cls, path, member: str = "data.npy", **kwargs) -> LazyStack:
        """Frames of a ``.npy`` member of a zip: memory-mapped when stored uncompressed."""
        offset, shape, dtype, fortran = npy_member_layout(path, member)
        if offset is not None and int(np.prod(shape)) > 0:
            ref = {"kind": "memmap", "offset": int(offset), "order": "F" if fortran else "C"}
        else:
            ref = {"kind": "zip-compressed", "member": member}
        ref.update(path=os.fspath(path), shape=tuple(shape), dtype=np.dtype(dtype).str)
        reader, closer = _open_ref(ref)
        return cls(path, shape, dtype, kind=ref["kind"], reader=reader, closer=closer, ref=ref,
                   **kwargs)

    @classmethod
    def from_hdf5(cls, path, dataset: str = "data", **kwargs) -> LazyStack:
        """Frames of an HDF5 dataset, opened read-only (never in append mode).

        The file is opened without the HDF5 file lock, so a file another process holds open
        for writing (Nion Swift, during and after an acquisition) can be read.
        """
        ref = {"kind": "hdf5", "path": os.fspath(path), "dataset": dataset}
        reader, closer, shape, dtype = _open_hdf5_dataset(ref["path"], dataset)
        ref.update(shape=tuple(shape), dtype=np.dtype(dtype).str)
        return cls(path, shape, dtype, kind="hdf5", reader=reader, closer=closer, ref=ref,
                   **kwargs)

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

        ref = _memmap_ref(array)
        out = cls(path, array.shape, array.dtype, kind=kind, reader=read, ref=ref, **kwargs)
        if ref is None:
            out._array = array
        return out

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
            frames = np.array(self._frames(int(first)))  # copy: a memmap view must not escape
            return frames[rest] if rest else frames
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            if step > 0:
                frames = np.array(self._frames(slice(start, stop, step)))
            else:  # h5py cannot step backwards: read forwards, then reverse
                idx = np.arange(start, stop, step)
                frames = (np.array(self._frames(slice(idx[-1], idx[0] + 1, -step)))[::-1]
                          if len(idx) else np.empty((0, *self.shape[1:]), self.dtype))
        else:  # list / integer or boolean array of frames: read sorted unique frames once
            idx = np.arange(self.shape[0])[np.asarray(first)]
            uniq, inverse = np.unique(idx, return_inverse=True)
            frames = np.array(self._frames(list(uniq) if self.kind == "hdf5" else uniq))
            frames = frames[inverse.reshape(idx.shape)]
            if idx.ndim != 1:
                return frames[(Ellipsis, *rest)] if rest else frames
        return frames[(slice(None), *rest)] if rest else frames

    def __array__(self, dtype=None, copy=None):
        out = np.array(self._frames(slice(None)))
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

    # ------------------------------------------------------------------ frame ranges, pickling
    @property
    def frames(self) -> tuple[int, int]:
        """The ``(start, stop)`` frames of the file this source covers (all, unless a view)."""
        return self._start, self._start + (self.shape[0] if self.shape else 0)

    def frame_range(self, start: int, stop: int) -> LazyStack:
        """A source over frames ``start:stop`` of this one, reading the same file.

        The view shares this source's open file (closing it is this source's job) and pickles
        to the same small file reference with its own frame range, so a task given
        ``src.frame_range(a, b)`` reads only its own frames.

        Raises
        ------
        ValueError
            If the range is not ``0 <= start <= stop <= len(self)`` or the source is 0-d.

        Examples
        --------
        >>> import numpy as np
        >>> from stemgpu.io.lazy import LazyStack
        >>> src = LazyStack.from_array("f.npy", np.arange(12.0).reshape(6, 2), kind="memory")
        >>> view = src.frame_range(2, 5)
        >>> view.shape, view.frames, view[0].tolist()
        ((3, 2), (2, 5), [4.0, 5.0])
        """
        if not self.shape:
            raise ValueError("frame_range needs a source with a frame axis; got a 0-d source")
        n = self.shape[0]
        start = check_int(start, "start", minimum=0, maximum=n)
        stop = check_int(stop, "stop", minimum=start, maximum=n)
        view = copy.copy(self)
        view.shape = (stop - start, *self.shape[1:])
        view._start = self._start + start
        view._closer = None  # the parent owns the open file
        view._open_lock = threading.Lock()
        view.metadata = dict(self.metadata)
        view.original_metadata = dict(self.original_metadata)
        return view

    def _frames(self, key):
        """Read ``key`` (an int, a forward slice, or sorted frame indices) of this range."""
        read = self._read
        if read is None:  # unpickled: open the file on first use, once
            with self._open_lock:
                if self._read is None:
                    self._read, self._closer = _open_ref(self._ref)
                read = self._read
        if self._start == 0 and (not self.shape or self.shape[0] == self._nfile):
            return read(key)
        if isinstance(key, int | np.integer):
            k = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= k < self.shape[0]:
                raise IndexError(f"frame {int(key)} is out of range for {self.shape[0]} frames")
            return read(self._start + k)
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            return read(slice(self._start + start, self._start + stop, step))
        if isinstance(key, list):
            return read([self._start + int(k) for k in key])
        return read(np.asarray(key) + self._start)

    def __reduce__(self):
        # A file reference, not the data: a dask task (or any process) reopens the file and
        # reads only what it indexes. original_metadata (the file's full properties, often
        # large) stays behind; pixel size and the normalised metadata travel.
        extra = (self.pixel_size_pm, self.metadata, self._start,
                 self.shape[0] if self.shape else 0)
        if self._ref is not None:
            return _from_ref, (self._ref, self.path, self.kind, *extra)
        if self._array is not None:
            return _from_array, (self.path, self._array, self.kind, *extra)
        raise TypeError(f"{self!r} cannot be pickled: it has no file reference")

    def __dask_tokenize__(self):
        # Same file, same range: same token (dask then reuses names); mtime and size
        # change the token when the file is rewritten.
        if self._ref is None:
            from dask.base import tokenize

            data = tokenize(self._array) if self._array is not None else id(self)
            return ("LazyStack", self.path, self.kind, data, self.frames)
        try:
            st = os.stat(self._ref["path"])
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        return ("LazyStack", sorted(self._ref.items()), self.frames, stamp)

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


def _open_hdf5_dataset(path: str, dataset: str):
    """(reader, closer, shape, dtype) of an HDF5 dataset opened read-only without locking."""
    import h5py

    fh = open_hdf5(path)
    try:
        dset = fh[dataset]
        if not isinstance(dset, h5py.Dataset):
            raise KeyError(dataset)
    except Exception:
        fh.close()
        raise
    return (lambda key: dset[key]), fh.close, dset.shape, dset.dtype


def _open_ref(ref: dict):
    """(reader, closer) over the whole frame axis of the file ``ref`` describes."""
    path, shape, dtype = ref["path"], tuple(ref["shape"]), np.dtype(ref["dtype"])
    if ref["kind"] == "memmap":
        mm = np.memmap(path, dtype=dtype, mode="r", offset=ref["offset"], shape=shape,
                       order=ref["order"])
        return (lambda key: mm[key]), None
    if ref["kind"] == "hdf5":
        reader, closer, got_shape, got_dtype = _open_hdf5_dataset(path, ref["dataset"])
        if tuple(got_shape) != shape or np.dtype(got_dtype) != dtype:
            closer()
            raise OSError(f"{path!r}: dataset {ref['dataset']!r} is now {got_shape} "
                          f"{np.dtype(got_dtype)}, was {shape} {dtype} when referenced")
        return reader, closer
    member = ref["member"]
    lock = threading.Lock()
    cache: dict[str, np.ndarray] = {}

    def read(key):
        with lock:  # dask may call from several threads; decompress only once
            if "a" not in cache:
                with zipfile.ZipFile(path, "r") as zf, zf.open(member) as fh:
                    cache["a"] = np.lib.format.read_array(fh)
        return cache["a"][key]

    return read, None


def _memmap_ref(array):
    """A file reference for a whole ``numpy.memmap`` (as tifffile returns), else None."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and array.filename and array.ndim and array.size):
        return None  # a view of a memmap has a memmap base, and its .offset is the parent's
    if array.flags.c_contiguous:
        order = "C"
    elif array.flags.f_contiguous:
        order = "F"
    else:
        return None
    return {"kind": "memmap", "path": os.fspath(array.filename), "offset": int(array.offset),
            "order": order, "shape": tuple(array.shape), "dtype": array.dtype.str}


def _restore(src: LazyStack, start: int, n: int) -> LazyStack:
    if not src.shape or (start == 0 and n == src.shape[0]):
        return src
    return src.frame_range(start, start + n)


def _from_ref(ref, path, kind, pixel_size_pm, metadata, start, n):
    """Unpickle a :class:`LazyStack`: the file is opened on the first read."""
    src = LazyStack(path, ref["shape"], ref["dtype"], kind=kind, reader=None, ref=ref,
                    pixel_size_pm=pixel_size_pm, metadata=metadata)
    return _restore(src, start, n)


def _from_array(path, array, kind, pixel_size_pm, metadata, start, n):
    src = LazyStack.from_array(path, array, kind=kind, pixel_size_pm=pixel_size_pm,
                               metadata=metadata)
    return _restore(src, start, n)
