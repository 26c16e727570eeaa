"""Save and load stemgpu results: one HDF5 file in pyNSID layout, written atomically.

Layout of a results file::

    /                         attrs: stemgpu_format="stemgpu-results", format version
    /Measurement_000/Channel_NNN/<name>/<name>
                              image-like results (registered stacks, mean images, sidpy
                              Datasets) written by pyNSID as sidpy datasets, calibrated in nm
    /stemgpu/provenance       JSON: stemgpu version, backend, device, every result's
                              parameters, input file path and SHA-256, versions, time
    /stemgpu/root             the saved object, serialised generically

The generic serialisation (exact round trip, dtypes included) is the HDF5 tree of
:mod:`stemgpu.io._tree` with the tagged JSON of :mod:`stemgpu.io._codec`; this module holds
the file handling: provenance, the atomic write and the public :func:`save` / :func:`load`.

Writing goes to a hidden temporary file in the target directory which is fsync'ed and then
renamed over the target (``os.replace``), or, with ``overwrite=False``, hard-linked to the
target name, which fails if the name exists (no check-then-rename race): a failed or killed
write never leaves a partial results file, and two saves never both succeed onto one name.
A temporary file left by a killed process is removed by the next ``save`` into the same
directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import secrets
import socket
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .._checks import check_bool
from .._inputs import is_sidpy_dataset
from ._codec import class_path, dumps, from_json, import_class
from ._tree import Writer, read_group, read_member
from .provenance import sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "is_results_file", "load", "read_provenance", "save"]

FORMAT = "stemgpu-results"
FORMAT_VERSION = 1
_TMP_SUFFIX = ".stemgpu-tmp"
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]

#: Test hook, not an API: when set, called with the open h5py file after the content is
#: written, before it is closed and renamed (tests raise or block here to simulate a crash
#: mid-write).
_before_commit = None


# ============================================================================ provenance


def _find_source(obj: Any) -> str | None:
    """An input file path recorded on the object or a sidpy Dataset inside it."""
    for attr in ("source", "input_path", "source_path"):
        val = getattr(obj, attr, None)
        if isinstance(val, str | os.PathLike) and os.path.isfile(val):
            return os.fspath(val)
    if is_sidpy_dataset(obj):
        src = (getattr(obj, "metadata", {}) or {}).get("source", {})
        if isinstance(src, Mapping) and isinstance(src.get("path"), str):
            return src["path"]
        return None
    # one level down: a dict of named results, or an analysis' results
    members = obj if isinstance(obj, Mapping) else getattr(obj, "results", None)
    if isinstance(members, Mapping):
        for value in members.values():
            if is_sidpy_dataset(value):
                found = _find_source(value)
                if found is not None:
                    return found
    return None


def _source_record(source: Any, obj: Any) -> dict | None:
    """The provenance record of the data a result came from (:func:`stemgpu.io.provenance.source_of`
    of ``source``, else of ``obj``, else the one ``analyze`` kept in its info), or None."""
    from .provenance import source_of

    for candidate in (source, obj):
        if candidate is None or isinstance(candidate, str | os.PathLike):
            continue
        record = source_of(candidate, checksum=False)
        if record is not None:
            return record
    info = getattr(obj, "results", {}).get("info") if hasattr(obj, "results") else None
    record = info.get("source") if isinstance(info, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def _provenance(writer: Writer, obj: Any, source: Any) -> dict:
    from .. import __version__
    from ..backend import resolve_backend

    src_path = None
    if source is not None:
        src_path = _find_source(source) if not isinstance(source, str | os.PathLike) \
            else os.fspath(source)
    record = _source_record(source, obj)
    if src_path is None:
        src_path = _find_source(obj) or (record or {}).get("path")
    src = None
    if src_path is not None:
        src = {"path": os.path.abspath(src_path), "sha256": None, "size_bytes": None}
        if os.path.isfile(src_path):
            src["sha256"] = sha256(src_path)
            src["size_bytes"] = os.path.getsize(src_path)
        if record and os.path.abspath(str(record.get("path"))) == src["path"]:
            # What stemgpu.open recorded: format, layout, the file's own metadata, and the
            # checksum at opening time (a file changed since then is visible in the two).
            src.update({k: v for k, v in record.items() if k not in src})
            src["sha256_at_open"] = record.get("sha256")
    backend = "cupy" if "cupy" in writer.backends else (
        sorted(writer.backends)[0] if writer.backends else "numpy")
    try:
        device = resolve_backend(backend).device_name
    except Exception as exc:  # e.g. cupy results saved on a machine without a GPU
        device = f"unknown ({type(exc).__name__})"
    import h5py

    return {
        "stemgpu_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(),
        "object_type": class_path(type(obj)),
        "backend": backend,
        "device": device,
        "parameters": writer.parameters,
        "source": src,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "platform": platform.platform(),
    }


# ============================================================================ file handling


def _clean_stale_temps(directory: str) -> None:
    """Remove temporaries of this host whose writing process no longer exists."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for fname in names:
        if not (fname.startswith(".") and fname.endswith(_TMP_SUFFIX)):
            continue
        parts = fname[: -len(_TMP_SUFFIX)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != _HOST_TAG or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(directory, fname))
            except OSError:
                pass
        except PermissionError:  # alive, owned by someone else
            continue


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(obj: Any, path: str | os.PathLike, *, overwrite: bool = False, source: Any = None,
         compression: str | None = None, progress: bool = False) -> str:
    """Save a result, a dict of named results or an analysis to one HDF5 (pyNSID) file.

    Parameters
    ----------
    obj : dataclass result, mapping of name -> result, or object with a ``results`` mapping
        Any frozen-dataclass result of stemgpu (``RigidResult``, ``AtomFit``, ...), sidpy
        Datasets, arrays, or containers of them. Registered stacks and mean images (fields
        named ``registered``, ``warped``, ``mean``...) are also written as calibrated sidpy
        datasets readable by pyNSID / SciFiReaders.
    path : str or os.PathLike
        Target file (conventionally ``.h5``).
    overwrite : bool
        Replace an existing file (atomically; the old file stays intact if the write fails).
    source : str, os.PathLike or sidpy.Dataset, optional
        The input file, recorded in the provenance with its SHA-256. By default taken from a
        ``source`` attribute of ``obj`` or from a Dataset opened with ``stemgpu.open``.
    compression : {None, "gzip", "lzf"}
        HDF5 compression of the generic array datasets.
    progress : bool
        Progress bar while copying streamed (on-disk) stacks.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    TypeError
        Something in ``obj`` cannot be stored (the message names where).
    ValueError
        Unknown ``compression``; ``overwrite`` or ``progress`` not a bool.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from dataclasses import dataclass
    >>> import stemgpu
    >>> path = os.path.join(tempfile.mkdtemp(), "result.h5")
    >>> _ = stemgpu.save({"shifts": np.zeros((5, 2)), "note": "demo"}, path)
    >>> back = stemgpu.load(path)
    >>> back["shifts"].shape, back["note"]
    ((5, 2), 'demo')
    """
    if compression is not None and not (isinstance(compression, str)
                                        and compression in ("gzip", "lzf")):
        raise ValueError(f"compression must be None, 'gzip' or 'lzf'; got {compression!r}")
    # overwrite="no" would read as true and replace the file: only a bool is an answer here
    overwrite = check_bool(overwrite, "overwrite")
    progress = check_bool(progress, "progress")
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r}: directory does not exist (for path={path!r})")
    with _atomic_h5(path, overwrite) as fh:
        _write_results(fh, obj, source, Writer(fh, compression, progress))
    return path


def _commit_new(tmp: str, path: str) -> None:
    """Move the finished ``tmp`` to ``path`` only if ``path`` does not exist, atomically.

    The check and the move are one operation, so of two ``overwrite=False`` saves racing for
    the same path exactly one succeeds and the other raises ``FileExistsError``. A hard link
    fails if the target exists; where the file system has no hard links, an ``O_EXCL``
    placeholder claims the name and the finished file is renamed over it.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it "
                              "(it was created while this save was writing)") from None
    except OSError:  # no hard links here (e.g. some network or FAT file systems)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it "
                                  "(it was created while this save was writing)") from None
        os.close(fd)
        os.replace(tmp, path)
        return
    os.remove(tmp)


@contextmanager
def _atomic_h5(path: str, overwrite: bool = True):
    """An h5py file open for writing under a temporary name, fsync'ed and moved to ``path``
    when the block succeeds, removed when it fails (``path`` then stays as it was).

    With ``overwrite`` the move replaces ``path`` (``os.replace``); without, it fails with
    ``FileExistsError`` when ``path`` exists at that moment (:func:`_commit_new`)."""
    import h5py

    directory = os.path.dirname(path)
    _clean_stale_temps(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{_HOST_TAG}.{os.getpid()}."
                                  f"{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with h5py.File(tmp, "w") as fh:
            yield fh
            if _before_commit is not None:
                _before_commit(fh)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _commit_new(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_results(fh, obj: Any, source: Any, writer: Writer) -> None:
    """The format attributes, the value tree of ``obj`` and its provenance."""
    from .. import __version__

    fh.attrs["stemgpu_format"] = FORMAT
    fh.attrs["stemgpu_format_version"] = FORMAT_VERSION
    root = fh.create_group("stemgpu")
    if _is_analysis_like(obj):  # store its results, remember its class
        writer.value(root, "root", dict(obj.results), "results")
        root.attrs["stemgpu_wrapper_class"] = class_path(type(obj))
    else:
        entry = writer.value(root, "root", obj, "result")
        root.attrs["stemgpu_root"] = json.dumps({**entry, "name": "root"})
    prov = _provenance(writer, obj, source)
    root.create_dataset("provenance", data=dumps(prov, "provenance"))
    fh.attrs["stemgpu_version"] = __version__


def _is_analysis_like(obj: Any) -> bool:
    return (not dataclasses.is_dataclass(obj) and not isinstance(obj, Mapping)
            and isinstance(getattr(obj, "results", None), Mapping))


def _open_results(path: Any):
    import h5py

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path!r}: not a stemgpu results file (not readable as HDF5: "
                         f"{exc})") from None
    if fh.attrs.get("stemgpu_format") != FORMAT or "stemgpu" not in fh:
        fh.close()
        raise ValueError(f"{path!r}: not a stemgpu results file (no stemgpu_format "
                         "attribute); Nion files are read with stemgpu.open")
    version = int(fh.attrs.get("stemgpu_format_version", 0))
    if version > FORMAT_VERSION:
        fh.close()
        raise ValueError(f"{path!r}: results format version {version} is newer than this "
                         f"stemgpu reads ({FORMAT_VERSION}); upgrade stemgpu")
    return fh


def load(path: str | os.PathLike, *, lazy: bool = False) -> Any:
    """Load what :func:`save` wrote: the same types, arrays as NumPy, dtypes unchanged.

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        Return 3-D arrays (registered stacks) as :class:`~stemgpu.io.lazy.LazyStack` read on
        demand instead of loading them.

    Returns
    -------
    object
        The saved dataclass / dict / list. An analysis-like object is rebuilt as
        ``cls(results=...)`` when possible, else its ``results`` dict is returned.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a stemgpu results file, or written by a newer format version.

    Examples
    --------
    >>> import os, tempfile, numpy as np, stemgpu
    >>> path = stemgpu.save([np.arange(3, dtype="i2")], os.path.join(tempfile.mkdtemp(), "r.h5"))
    >>> stemgpu.load(path)[0].dtype
    dtype('int16')
    """
    lazy = check_bool(lazy, "lazy")
    with _open_results(path) as fh:
        root = fh["stemgpu"]
        wrapper = root.attrs.get("stemgpu_wrapper_class")
        if wrapper is not None:
            results = read_group(root["root"], lazy)
            try:
                cls = import_class(wrapper)
                return cls(results=results)
            except Exception as exc:
                warnings.warn(f"could not rebuild {wrapper} ({type(exc).__name__}: {exc}); "
                              "returning its results dict", stacklevel=2)
                return results
        entry = json.loads(root.attrs["stemgpu_root"])
        return read_member(root, entry, lazy)


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance record of a results file (version, backend, device, parameters, source).

    Examples
    --------
    >>> import os, tempfile, numpy as np, stemgpu
    >>> from stemgpu.io.results import read_provenance
    >>> path = stemgpu.save({"a": 1}, os.path.join(tempfile.mkdtemp(), "r.h5"))
    >>> read_provenance(path)["stemgpu_version"] == stemgpu.__version__
    True
    """
    with _open_results(path) as fh:
        return from_json(json.loads(fh["stemgpu/provenance"].asstr()[()]))


def is_results_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is an HDF5 file written by :func:`save` (False for anything else).

    Examples
    --------
    >>> import os, tempfile, stemgpu
    >>> from stemgpu.io.results import is_results_file
    >>> path = stemgpu.save({"a": 1}, os.path.join(tempfile.mkdtemp(), "r.h5"))
    >>> is_results_file(path), is_results_file(os.path.dirname(path))
    (True, False)
    """
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return "stemgpu_format" in fh.attrs
    except OSError:
        return False
