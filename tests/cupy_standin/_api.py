"""The checked-in list of CuPy's public names and parameters (``cupy_api.json``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

API_FILE = Path(__file__).with_name("cupy_api.json")


class CupyApiError(AttributeError):
    """A name or keyword the installed CuPy release does not have (the stand-in refuses it)."""


@functools.cache
def api() -> dict:
    return json.loads(API_FILE.read_text())


def version() -> str:
    return api()["cupy_version"]


def module_entries(module: str) -> dict:
    return api()["modules"][module]


def class_entries(cls: str) -> dict:
    return api()["classes"][cls]


def check_call(where: str, params: list | None, args: tuple, kwargs: dict) -> None:
    """Refuse keywords (and surplus positional arguments) that CuPy's signature lacks."""
    if params is None:  # no signature recorded (some ufuncs): nothing to check against
        return
    kinds = {name: kind for name, kind in params}
    if "**" not in kinds.values():
        bad = [k for k in kwargs if kinds.get(k) not in ("PK", "K")]
        if bad:
            accepted = [n for n, k in params if k in ("PK", "K")]
            raise TypeError(f"{where}() got an unexpected keyword argument {bad[0]!r} "
                            f"(CuPy {version()} accepts {accepted})")
    if "*" not in kinds.values():
        n_pos = sum(k in ("P", "PK") for _, k in params)
        if len(args) > n_pos:
            raise TypeError(f"{where}() takes at most {n_pos} positional arguments in CuPy "
                            f"{version()}; got {len(args)}")
