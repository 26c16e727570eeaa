"""A temporary chunked frame store: large stage outputs written batch by batch to disk.

A streamed analysis (a lazy input, :func:`stemgpu.open_frames`) never holds a whole stack:
the demons stage writes its registered frames (and displacement fields) here, one frame
batch at a time, and reads them back as lazy frame sources
(:class:`~stemgpu.io.lazy.LazyStack`: frame slicing, ``shape``/``dtype``, picklable to a
file reference), which tracking fits batch by batch and :func:`stemgpu.save` copies into
the results file chunk by chunk.

The store is one HDF5 file (h5py) in a fresh temporary folder: next to the output when the
caller knows it (same file system, so no surprise on a small ``/tmp``), else in
:func:`tempfile.gettempdir`. Every dataset is chunked one frame per chunk, uncompressed
(writing and reading a frame is one contiguous chunk). A dataset is marked complete
(``attrs["complete"]``) only when every frame was written; an incomplete one is never
served (:meth:`FrameStore.array` raises). The folder is removed by :meth:`FrameStore.close`
(or leaving its ``with`` block), else when the store and every array read from it are
garbage-collected, else at interpreter exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np

__all__ = ["FrameStore", "IncompleteStoreError"]


class IncompleteStoreError(ValueError):
    """A store dataset was read before every frame of it was written."""


def _remove(directory: str, handles: list) -> None:
    for h in handles:  # open h5py files first: HDF5 keeps them open otherwise
        close = h() if isinstance(h, weakref.WeakMethod) else h
        try:
            if close is not None:
                close()
        except Exception:
            pass
    shutil.rmtree(directory, ignore_errors=True)


class FrameStore:
    """Chunked on-disk arrays of frames (``(n, ...)``), written batch by batch.

    Parameters
    ----------
    directory : str or os.PathLike, optional
        Where the store's temporary folder is made (default: the system temporary folder).
        It must exist.

    Attributes
    ----------
    path : str
        The HDF5 file.
    directory : str
        The temporary folder holding it (removed by :meth:`close`).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.io.store import FrameStore
    >>> with FrameStore() as store:
    ...     store.create("frames", (5, 4, 4), "float32")
    ...     for start in (0, 3):
    ...         store.write("frames", start, np.full((min(3, 5 - start), 4, 4), start, "f4"))
    ...     store.finish()
    ...     frames = store.array("frames")
    ...     frames.shape, float(frames[4, 0, 0])
    ((5, 4, 4), 3.0)
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        import h5py

        if directory is not None:
            directory = os.fspath(directory)
            if not os.path.isdir(directory):
                raise ValueError(f"directory must be an existing folder; got {directory!r}")
        self.directory = tempfile.mkdtemp(prefix=".stemgpu-store-", dir=directory)
        self.path = os.path.join(self.directory, "frames.h5")
        self._closers: list = []
        try:
            self._fh = h5py.File(self.path, "w")
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._closers.append(self._fh.close)
        self._written: dict[str, np.ndarray] = {}
        self._done: set[str] = set()
        self._finalizer = weakref.finalize(self, _remove, self.directory, self._closers)

    # ------------------------------------------------------------------ writing
    def create(self, name: str, shape, dtype) -> None:
        """A new dataset ``name`` of ``shape`` (frames first), one frame per chunk."""
        self._check_open()
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or shape[0] < 1 or min(shape) < 1:
            raise ValueError(f"shape must be (frames >= 1, ...) with every size >= 1; got "
                             f"{shape}")
        if name in self._written:
            raise ValueError(f"name: dataset {name!r} already exists in the store")
        dset = self._fh.create_dataset(name, shape=shape, dtype=np.dtype(dtype),
                                       chunks=(1, *shape[1:]))
        dset.attrs["complete"] = False
        self._written[name] = np.zeros(shape[0], dtype=bool)

    def write(self, name: str, start: int, data) -> None:
        """Frames ``start : start + len(data)`` of dataset ``name`` (host arrays)."""
        self._check_open()
        if name not in self._written:
            raise KeyError(f"name: no dataset {name!r} in the store")
        data = np.asarray(data)
        dset = self._fh[name]
        stop = int(start) + data.shape[0]
        if not 0 <= int(start) <= stop <= dset.shape[0] or data.shape[1:] != dset.shape[1:]:
            raise ValueError(f"data of shape {data.shape} at frame {start} does not fit "
                             f"dataset {name!r} of shape {dset.shape}")
        dset[int(start):stop] = data
        self._written[name][int(start):stop] = True

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of ``name`` while writing (frames already written)."""
        if self._fh is None or self.closed:
            raise ValueError("store: not open for writing (read the array() instead)")
        done = self._written[name][int(start):int(stop)]
        if not done.all():
            raise IncompleteStoreError(f"store: frames {start}:{stop} of {name!r} are not "
                                       "all written")
        return self._fh[name][int(start):int(stop)]

    def finish(self) -> None:
        """Mark every fully written dataset complete and close the writer.

        Raises
        ------
        IncompleteStoreError
            Some dataset has frames never written (it stays flagged incomplete).
        """
        self._check_open()
        missing = {k: int((~v).sum()) for k, v in self._written.items() if not v.all()}
        for name, done in self._written.items():
            if done.all():
                self._fh[name].attrs["complete"] = True
                self._done.add(name)
        self._fh.flush()
        self._fh.close()
        self._fh = None
        if missing:
            raise IncompleteStoreError(f"store: frames never written: {missing}")

    # ------------------------------------------------------------------ reading
    def array(self, name: str, *, owner: Any = None):
        """Dataset ``name`` as a lazy frame source (after :meth:`finish`).

        The source keeps this store alive (its folder is not removed while the source is
        referenced) and pickles to a file reference (``LazyStack``): a dask task reads its
        own frames. ``owner`` is kept alive by it too.

        Raises
        ------
        IncompleteStoreError
            Not every frame of ``name`` was written, or :meth:`finish` was not called.
        """
        from .lazy import LazyStack

        if self._finalizer is None or not self._finalizer.alive:
            raise ValueError("store: closed (its files are removed)")
        if self._fh is not None:
            raise IncompleteStoreError(f"store: {name!r} read before finish()")
        if name not in self._done:
            raise IncompleteStoreError(f"store: dataset {name!r} is incomplete or absent")
        src = LazyStack.from_hdf5(self.path, name)
        # weakly: the finalizer holds this list, and must not keep the arrays alive
        self._closers.append(weakref.WeakMethod(src.close))
        src._store = self  # the folder lives as long as the arrays read from it
        src._owner = owner
        return src

    # ------------------------------------------------------------------ lifetime
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("store: closed (its files are removed)")
        if self._fh is None:
            raise ValueError("store: already finished (no more writing)")

    def close(self) -> None:
        """Close every file and remove the store's folder (the arrays read from it die)."""
        self._fh = None
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("writing" if self._fh is not None else "done")
        return f"FrameStore({self.path!r}, {state}, datasets={sorted(self._written)})"
