"""Reading microscope data and writing results: Nion files, pyNSID files, lazy stacks, sidpy.

:mod:`~stemgpu.io.nion` reads Nion Swift ``.ndata1`` / ``.h5`` (``stemgpu.open``,
``stemgpu.open_frames``), :mod:`~stemgpu.io.nsid` pyNSID HDF5 images, :mod:`~stemgpu.io.lazy`
streams frames from disk, :mod:`~stemgpu.io.sidpy_io` converts to and from
``sidpy.Dataset``; :mod:`~stemgpu.io.results` saves and loads results files (their HDF5 tree in
:mod:`~stemgpu.io._tree`, its tagged JSON in :mod:`~stemgpu.io._codec`). Everything here runs
on the host. Names are loaded on first use: ``import stemgpu.io`` imports neither h5py nor
sidpy.

Examples
--------
>>> import stemgpu.io
>>> stemgpu.io.save.__module__
'stemgpu.io.results'
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Public name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY = {
    "NionFormatError": "stemgpu.io.nion",
    "open": "stemgpu.io.nion",
    "open_frames": "stemgpu.io.nion",
    "read_nion": "stemgpu.io.nion",
    "read_nsid": "stemgpu.io.nsid",
    "LazyStack": "stemgpu.io.lazy",
    "to_dataset": "stemgpu.io.sidpy_io",
    "from_dataset": "stemgpu.io.sidpy_io",
    "save": "stemgpu.io.results",
    "load": "stemgpu.io.results",
    "read_provenance": "stemgpu.io.results",
    "is_results_file": "stemgpu.io.results",
    "source_of": "stemgpu.io.provenance",
    "read_file": "stemgpu.io.formats",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
