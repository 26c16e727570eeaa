"""Argument checks for the public boundary, with one message format.

Every check raises ``ValueError`` (or ``TypeError`` where the *kind* of object is wrong) with
a message of the form ``"<argument> must be <what is accepted>; got <value>"``, so a user
always learns which argument was wrong, what it received and what it accepts. Checks return
the value converted to the plain Python type the algorithms use.

Examples
--------
>>> from stemgpu._checks import check_int, check_real, check_choice
>>> check_int(3, "levels", minimum=1)
3
>>> check_real(0.5, "sigma", greater=0)
0.5
>>> check_choice("mle", "estimator", ("mle", "lsq"))
'mle'
>>> check_int(0, "levels", minimum=1)
Traceback (most recent call last):
...
ValueError: levels must be an integer >= 1; got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "check_batch_size",
    "check_bool",
    "check_choice",
    "check_int",
    "check_pair",
    "check_real",
    "fail",
]


def fail(name: str, accepted: str, value: Any, error: type[Exception] = ValueError):
    """Raise ``error`` with the project's message format (never returns).

    Examples
    --------
    >>> from stemgpu._checks import fail
    >>> fail("order", "'fourier' or 'spline'", "cubic")
    Traceback (most recent call last):
    ...
    ValueError: order must be 'fourier' or 'spline'; got 'cubic'
    """
    raise error(f"{name} must be {accepted}; got {value!r}")


def _bounds_text(minimum, maximum, greater=None) -> str:
    parts = []
    if greater is not None:
        parts.append(f"> {greater:g}")
    if minimum is not None:
        parts.append(f">= {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    return " and ".join(parts)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (NumPy bools too); anything else, e.g. the
    string ``"no"``, which ``if value:`` would take as true, is refused.

    Examples
    --------
    >>> from stemgpu._checks import check_bool
    >>> check_bool(False, "overwrite")
    False
    >>> check_bool("no", "overwrite")
    Traceback (most recent call last):
    ...
    ValueError: overwrite must be True or False; got 'no'
    """
    if not isinstance(value, bool | np.bool_):
        fail(name, "True or False", value)
    return bool(value)


def check_int(value: Any, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (bools and floats refused).

    Examples
    --------
    >>> from stemgpu._checks import check_int
    >>> check_int(5, "n", minimum=1, maximum=10)
    5
    """
    bounds = _bounds_text(minimum, maximum)
    accepted = "an integer" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, accepted, value)
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        fail(name, accepted, value)
    return v


def check_real(value: Any, name: str, *, minimum: float | None = None,
               maximum: float | None = None, greater: float | None = None) -> float:
    """``value`` as a finite ``float``; ``greater`` is a strict, ``minimum``/``maximum``
    inclusive bound. Strings, bools, NaN and infinities are refused.

    Examples
    --------
    >>> from stemgpu._checks import check_real
    >>> check_real(2, "pixel_size", greater=0)
    2.0
    >>> check_real("2", "pixel_size", greater=0)
    Traceback (most recent call last):
    ...
    ValueError: pixel_size must be a finite number > 0; got '2'
    """
    bounds = _bounds_text(minimum, maximum, greater)
    accepted = "a finite number" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, accepted, value)
    v = float(value)
    if (not math.isfinite(v) or (greater is not None and v <= greater)
            or (minimum is not None and v < minimum) or (maximum is not None and v > maximum)):
        fail(name, accepted, value)
    return v


def check_pair(value: Any, name: str, *, minimum: float | None = None,
               greater: float | None = None, unit: str = "px") -> tuple[float, float]:
    """A number or a ``(row, col)`` pair of finite numbers, returned as a pair of floats.

    Examples
    --------
    >>> from stemgpu._checks import check_pair
    >>> check_pair(1.5, "sigma", minimum=0)
    (1.5, 1.5)
    >>> check_pair((1, 2), "max_shift", greater=0)
    (1.0, 2.0)
    """
    bounds = _bounds_text(minimum, None, greater)
    accepted = (f"a number {bounds} or a (row, col) pair of them, in {unit}" if bounds
                else f"a number or a (row, col) pair of numbers, in {unit}")
    if isinstance(value, bool | str | bytes):
        fail(name, accepted, value)
    try:
        pair = np.broadcast_to(np.asarray(value, dtype=float), (2,))
    except (TypeError, ValueError):
        fail(name, accepted, value)
    if (not np.all(np.isfinite(pair)) or (greater is not None and np.any(pair <= greater))
            or (minimum is not None and np.any(pair < minimum))):
        fail(name, accepted, value)
    return (float(pair[0]), float(pair[1]))


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by identity or equality).

    Examples
    --------
    >>> from stemgpu._checks import check_choice
    >>> check_choice("cubic", "order", ("fourier", "spline"))
    Traceback (most recent call last):
    ...
    ValueError: order must be one of 'fourier', 'spline'; got 'cubic'
    """
    choices = tuple(choices)
    for c in choices:
        try:
            if value is c or bool(value == c):
                return c if isinstance(c, str) else value
        except (TypeError, ValueError):  # e.g. an array compared with a string
            continue
    fail(name, "one of " + ", ".join(repr(c) for c in choices), value)


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int | str:
    """``"auto"`` or an integer >= 1 (the number of frames or fits processed at once).

    Examples
    --------
    >>> from stemgpu._checks import check_batch_size
    >>> check_batch_size("auto"), check_batch_size(8)
    ('auto', 8)
    """
    if isinstance(batch_size, str) and batch_size == "auto":
        return "auto"
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        fail(name, "'auto' or an integer >= 1", batch_size)
    return int(batch_size)
