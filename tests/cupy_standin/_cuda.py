"""``cupy.cuda`` of the stand-in: one device (the host), its runtime queries and streams."""

from __future__ import annotations

import os
import time

from . import _api, _core

#: What ``runtime.getDeviceProperties`` answers (the keys stemgpu reads, CUDA's names).
DEVICE_NAME = b"CuPy stand-in (NumPy on the host CPU)"


def _host_memory() -> tuple[int, int]:
    free = total = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                elif line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return free or 4 * 1024**3, total or 8 * 1024**3


class CUDARuntimeError(RuntimeError):
    pass


class Device:
    """``cupy.cuda.Device``: device 0 only (the stand-in has one device)."""

    def __init__(self, device=None):
        dev = 0 if device is None else int(device)
        if dev != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = dev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        pass

    def synchronize(self):
        _core._bump("synchronize", "Device.synchronize()")

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        return _host_memory()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("standin-device", self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """``cupy.cuda.Stream``: work is done when issued; ``synchronize`` only counts."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self):
        _core._bump("synchronize", "Stream.synchronize()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self


Stream.null = Stream(null=True)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        _core._bump("synchronize", "Event.synchronize()")

    @property
    def done(self):
        return True


def get_elapsed_time(start_event, end_event):
    return (end_event._t - start_event._t) * 1e3


class MemoryPointer:
    def __init__(self, ptr: int):
        self.ptr = ptr
        self.device_id = 0


def get_current_stream(device_id=None):
    return Stream.null


def get_device_id():
    return 0


def is_available():
    return True


def getDeviceCount():
    return 1


def getDevice():
    return 0


def getDeviceProperties(device):
    Device(device)
    free, total = _host_memory()
    return {"name": DEVICE_NAME, "totalGlobalMem": total, "major": 9, "minor": 0,
            "multiProcessorCount": os.cpu_count() or 1, "clockRate": 0,
            "singleToDoublePrecisionPerfRatio": 2, "warpSize": 32,
            "maxThreadsPerBlock": 1024, "sharedMemPerBlock": 48 * 1024}


def memGetInfo():
    return _host_memory()


def deviceSynchronize():
    _core._bump("synchronize", "runtime.deviceSynchronize()")


def runtimeGetVersion():
    return 13000


def driverGetVersion():
    return 13000


_RUNTIME = {n: globals()[n] for n in (
    "getDeviceCount", "getDevice", "getDeviceProperties", "memGetInfo", "deviceSynchronize",
    "runtimeGetVersion", "driverGetVersion", "CUDARuntimeError")}
_CUDA = {n: globals()[n] for n in (
    "Device", "Stream", "Event", "MemoryPointer", "get_current_stream", "get_device_id",
    "is_available", "get_elapsed_time")}


def module(name: str):
    from ._modules import StrictModule

    if name == "cupy.cuda.runtime":
        mod = StrictModule(name, {k: _checked(name, k, v) for k, v in _RUNTIME.items()})
    elif name == "cupy.cuda":
        over = {k: _checked(name, k, v) if k[0].islower() else v for k, v in _CUDA.items()}
        mod = StrictModule(name, over)
        mod._overrides["runtime"] = module("cupy.cuda.runtime")
    else:
        mod = StrictModule(name)
    return mod


def _checked(module_name, name, fn):
    entry = _api.module_entries(module_name).get(name)
    if entry is None:
        raise _api.CupyApiError(f"{module_name}.{name} is not in CuPy {_api.version()}")
    params = entry.get("params")
    if not callable(fn) or isinstance(fn, type) or params is None:
        return fn

    def f(*args, **kwargs):
        _api.check_call(f"{module_name}.{name}", params, args, kwargs)
        return fn(*args, **kwargs)

    f.__name__ = name
    return f
