"""Provenance of the data stemgpu reads: where a Dataset or frame source came from.

Every reader stores a record in ``metadata["source"]`` (:func:`source_record`);
:func:`source_of` gives it back (computing the file's SHA-256 once when a lazy open skipped
it); :func:`sha256` is the one file checksum of the package (results files record it too).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

__all__ = ["sha256", "source_of", "source_record"]

def sha256(path: str) -> str:
    """SHA-256 hex digest of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: str) -> dict:
    st = os.stat(path)
    modified = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    return {"size_bytes": int(st.st_size), "modified_utc": modified.isoformat(),
            "mtime_ns": int(st.st_mtime_ns)}


def source_record(path: str, fmt: str, storage: str, *, checksum: bool, **extra) -> dict:
    """The provenance record stored as ``metadata["source"]`` by every stemgpu reader.

    ``checksum=False`` leaves ``sha256`` None; :func:`source_of` computes it on first use.
    ``extra`` keys (e.g. ``layout``, ``item``) are added to the record.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from stemgpu.io.provenance import source_record
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "file.bin"
    >>> _ = path.write_bytes(b"abc")
    >>> rec = source_record(path, "raw", "memory", checksum=True)
    >>> rec["size_bytes"], rec["sha256"][:12]
    (3, 'ba7816bf8f01')
    """
    path = os.path.abspath(path)
    record = {"path": path, "format": fmt, "storage": storage, **_stat(path), "sha256": None,
              **extra}
    if checksum:
        record["sha256"] = sha256(path)
    return record


def source_of(obj: Any, *, checksum: bool = True) -> dict | None:
    """Where a Dataset (or frame source) opened by stemgpu came from, or None.

    Every Dataset from :func:`stemgpu.open` and every source from :func:`stemgpu.open_frames`
    keeps its provenance in ``metadata["source"]``: ``path`` (absolute), ``format`` (e.g.
    ``"nion-ndata"``, ``"nion-ndata1"``, ``"nion-h5"``, ``"nion-nhdf"``, ``"nion-tiff"``,
    ``"rsciio-digitalmicrograph"``), ``storage``, ``size_bytes``, ``modified_utc``,
    ``mtime_ns`` and ``sha256``; the file's own metadata is ``original_metadata``.

    Parameters
    ----------
    obj : sidpy.Dataset or LazyStack
        Anything with such a ``metadata["source"]`` record.
    checksum : bool
        Compute the SHA-256 now if the record lacks it (a lazy open does not read the whole
        file). It is then stored in the record, so it is computed once. If the file's size
        or modification time changed since it was opened, ``changed_since_open`` is True.

    Returns
    -------
    dict or None
        A copy of the record plus ``original_metadata``; None when ``obj`` has no record.

    Examples
    --------
    >>> import io, json, os, tempfile, zipfile, numpy as np
    >>> import stemgpu
    >>> from stemgpu.io.provenance import source_of
    >>> # a Nion Swift library item: data.npy + metadata.json in an uncompressed zip
    >>> props = {"dimensional_calibrations": [{"offset": 0, "scale": 0.0146, "units": "nm"}] * 2,
    ...          "created": "2024-03-05T13:07:31.123456"}
    >>> npy = io.BytesIO(); np.save(npy, np.ones((8, 8), "f4"))
    >>> path = os.path.join(tempfile.mkdtemp(), "image.ndata")
    >>> with zipfile.ZipFile(path, "w") as zf:
    ...     zf.writestr("data.npy", npy.getvalue()); zf.writestr("metadata.json", json.dumps(props))
    >>> src = source_of(stemgpu.open(path))
    >>> src["format"], len(src["sha256"]), src["original_metadata"]["created"]
    ('nion-ndata', 64, '2024-03-05T13:07:31.123456')
    """
    meta = getattr(obj, "metadata", None)
    record = meta.get("source") if isinstance(meta, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    if checksum and record.get("sha256") is None and os.path.isfile(record["path"]):
        now = _stat(record["path"])
        record["sha256"] = sha256(record["path"])
        if (now["size_bytes"], now["mtime_ns"]) != (record.get("size_bytes"),
                                                    record.get("mtime_ns")):
            record["changed_since_open"] = True
    out = dict(record)
    original = getattr(obj, "original_metadata", None)
    out["original_metadata"] = dict(original) if isinstance(original, dict) else {}
    return out


