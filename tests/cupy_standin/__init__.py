"""A strict CuPy stand-in for the test suite: the CuPy code paths run on machines without a GPU.

``install()`` puts NumPy-backed ``cupy`` and ``cupyx`` modules into :data:`sys.modules`. They
enforce what real CuPy enforces and a CPU run would otherwise let through:

- no implicit device-to-host conversion: ``np.asarray(x)`` / ``x.__array__()`` raise
  CuPy's TypeError; ``float``/``int``/``bool``/``complex`` of a size-1 array work and are
  counted as synchronising transfers; ``.get()``, ``cupy.asnumpy``, ``tolist``, ``item``,
  ``repr`` are counted device-to-host copies, ``cupy.asarray(host)`` host-to-device ones
  (:func:`counts`, :func:`count_transfers`); ``cupyx.allow_synchronize(False)`` makes them
  raise ``cupyx.DeviceSynchronized``;
- NumPy arrays as operands of device functions, ufuncs and operators raise TypeError;
- only the names and keyword arguments of the CuPy release recorded in ``cupy_api.json``
  (written by ``make_api_list.py`` from an installed CuPy) exist;
- ``RawModule``/``RawKernel`` launches run the nvcc host build of ``kernels/`` after checking
  argument types, dtypes, contiguity, sizes and the launch grid;
- ``cupy.cuda``: one device, ``runtime.getDeviceProperties``/``memGetInfo``, streams, events.

Enable it for a process with ``STEMGPU_CUPY_STANDIN=1`` (``stemgpu.backend`` then imports
it instead of CuPy; ``tests/`` must be on ``PYTHONPATH``). The test suite does this itself when
no real GPU is usable (``autoenable``); ``STEMGPU_CUPY_STANDIN=0`` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._api import CupyApiError
from ._core import (
    IMPLICIT_MESSAGE,
    Counts,
    DeviceSynchronized,
    count_transfers,
    counts,
    reset_counts,
)

__all__ = ["ENV_VAR", "IMPLICIT_MESSAGE", "CupyApiError", "Counts", "DeviceSynchronized",
           "active", "count_transfers", "counts", "enable", "install", "reset_counts"]

ENV_VAR = "STEMGPU_CUPY_STANDIN"
_MODULES = ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cupy.linalg", "cupy.fft", "cupy.random",
            "cupyx", "cupyx.scipy", "cupyx.scipy.fft", "cupyx.scipy.ndimage",
            "cupyx.scipy.linalg", "cupyx.scipy.special", "cupyx.scipy.signal")
_installed = False


def install():
    """Register the stand-in ``cupy``/``cupyx`` in :data:`sys.modules` (once) and return
    ``cupy``. Later calls change nothing, so a test that monkeypatches ``sys.modules['cupy']``
    keeps its patch."""
    global _installed
    from ._modules import cupy_module, cupyx_module, submodule

    cupy = cupy_module()
    if _installed:
        return cupy
    for name in [m for m in sys.modules if m.split(".")[0] in ("cupy", "cupyx")]:
        del sys.modules[name]  # a real CuPy imported by a probe
    cupyx = cupyx_module()
    for name in _MODULES:
        sys.modules[name] = (cupy if name == "cupy" else cupyx if name == "cupyx"
                             else submodule(name))
    _installed = True
    return cupy


def active() -> bool:
    """True when ``import cupy`` gives the stand-in."""
    return bool(getattr(sys.modules.get("cupy"), "__standin__", False))


def enable() -> None:
    """Use the stand-in in this process and in its subprocesses (``STEMGPU_CUPY_STANDIN=1``
    and ``tests/`` on ``PYTHONPATH``)."""
    os.environ[ENV_VAR] = "1"
    here = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in paths if p])
    install()
    import stemgpu.backend

    stemgpu.backend._clear_caches()
