"""Write ``cupy_api.json``: every public name, and the parameters of every callable, of the
installed CuPy (the list the stand-in checks the code against).

Run where CuPy is installed (a GPU is *not* needed: CuPy imports without one; only its
``cupyx.scipy.linalg`` needs the cuBLAS/cuSOLVER libraries, e.g. ``cupy-cuda13x[ctk]``)::

    python tests/cupy_standin/make_api_list.py   # rewrites cupy_api.json beside it

Signatures come from :func:`inspect.signature`, or, for Cython functions and ufuncs that have
none, from the embedded signature on the first line of their docstring (CuPy builds with
``embedsignature``). Only names are recorded, never code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

#: Namespaces recorded as modules (attribute lists + signatures of their callables).
MODULES = (
    "cupy", "cupy.linalg", "cupy.fft", "cupy.random", "cupy.cuda", "cupy.cuda.runtime",
    "cupyx", "cupyx.scipy", "cupyx.scipy.fft", "cupyx.scipy.ndimage", "cupyx.scipy.linalg",
    "cupyx.scipy.special", "cupyx.scipy.signal",
)
#: Classes recorded with their public methods and attributes.
CLASSES = (
    "cupy.ndarray", "cupy.ufunc", "cupy.cuda.Device", "cupy.cuda.Stream", "cupy.cuda.Event",
    "cupy.RawModule", "cupy.RawKernel", "cupy.cuda.MemoryPointer", "cupy.flatiter",
)
OUT = Path(__file__).with_name("cupy_api.json")

_KIND = {
    inspect.Parameter.POSITIONAL_ONLY: "P",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "PK",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.KEYWORD_ONLY: "K",
    inspect.Parameter.VAR_KEYWORD: "**",
}


def _from_doc(obj) -> list | None:
    """Parameters from an embedded ``name(a, b=1, *, c=None) -> T`` docstring line."""
    doc = getattr(obj, "__doc__", None) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    m = re.match(r"^[\w.]*?(\w+)\((.*)\)(\s*->.*)?$", first.replace("\\*", "*"))
    if not m:
        return None
    args = m.group(2)
    # Cython writes typed arguments ("int device", "str code=None"): keep the last word.
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    cleaned = []
    for p in parts:
        p = p.strip()
        name, eq, default = p.partition("=")
        words = name.split()
        cleaned.append(words[-1] + ("=None" if eq else "") if words else p)
    try:
        fn = ast.parse(f"def f({', '.join(cleaned)}): pass").body[0]
    except SyntaxError:
        return None
    a = fn.args
    out = [[x.arg, "P"] for x in a.posonlyargs] + [[x.arg, "PK"] for x in a.args]
    if a.vararg:
        out.append([a.vararg.arg, "*"])
    out += [[x.arg, "K"] for x in a.kwonlyargs]
    if a.kwarg:
        out.append([a.kwarg.arg, "**"])
    if out and out[0][0] == "self":
        out = out[1:]
    return out


def _params(obj) -> list | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return _from_doc(obj)
    params = [[p.name, _KIND[p.kind]] for p in sig.parameters.values()]
    if params == [["args", "*"], ["kwargs", "**"]]:  # a Cython wrapper: the doc says more
        return _from_doc(obj) or params
    return params


def _entry(obj, numpy_mod) -> dict:
    import numpy

    if inspect.ismodule(obj):
        return {"kind": "module", "name": obj.__name__}
    if isinstance(obj, numpy.dtype) or (isinstance(obj, type) and issubclass(obj, numpy.generic)):
        return {"kind": "numpy"}
    if type(obj).__name__ == "ufunc" and type(obj).__module__.startswith("cupy"):
        return {"kind": "ufunc", "params": _params(obj), "nin": obj.nin, "nout": obj.nout}
    if inspect.isclass(obj):
        return {"kind": "class", "params": _params(obj)}
    if callable(obj):
        return {"kind": "function", "params": _params(obj)}
    if isinstance(obj, (bool, int, float, complex, str, type(None))):
        return {"kind": "constant"}
    return {"kind": "object", "type": type(obj).__name__}


def _members(obj, is_class: bool) -> list[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if is_class:
        names += [n for n in ("__array__", "__cuda_array_interface__", "__dlpack__",
                              "__array_ufunc__", "__array_function__", "__float__", "__int__",
                              "__bool__", "__complex__", "__index__", "__len__", "__iter__",
                              "__format__", "__call__", "__enter__", "__exit__")
                  if hasattr(obj, n)]
    return sorted(set(names))


def generate() -> dict:
    import cupy
    import numpy

    api: dict = {"cupy_version": cupy.__version__, "numpy_version": numpy.__version__,
                 "python": sys.version.split()[0], "modules": {}, "classes": {}}
    for modname in MODULES:  # import all first: submodules appear in their parents' dir()
        importlib.import_module(modname)
    for modname in MODULES:
        mod = importlib.import_module(modname)
        entries = {}
        for name in _members(mod, False):
            try:
                obj = getattr(mod, name)
            except Exception:  # noqa: BLE001 - a lazy attribute needing a library
                continue
            entries[name] = _entry(obj, numpy)
        api["modules"][modname] = entries
    for clsname in CLASSES:
        modname, _, attr = clsname.rpartition(".")
        cls = getattr(importlib.import_module(modname), attr)
        entries = {}
        for name in _members(cls, True):
            raw = inspect.getattr_static(cls, name, None)
            if isinstance(raw, (property, type(cupy.ndarray.shape))) or (
                    type(raw).__name__ in ("getset_descriptor", "member_descriptor")):
                entries[name] = {"kind": "attribute"}
            else:
                obj = getattr(cls, name)
                entries[name] = ({"kind": "method", "params": _params(obj)} if callable(obj)
                                 else {"kind": "attribute"})
        api["classes"][clsname] = entries
    return api


def main() -> None:
    api = generate()
    OUT.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
    n = sum(len(v) for v in api["modules"].values()) + sum(len(v) for v in api["classes"].values())
    print(f"wrote {OUT} ({n} names, CuPy {api['cupy_version']})")


if __name__ == "__main__":
    main()
