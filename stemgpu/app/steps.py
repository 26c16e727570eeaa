"""The stage names of :func:`stemgpu.analyze` and the checks of its ``steps`` and options.

Defined once here; ``analyze`` and ``stemgpu run --steps`` both use them.

Examples
--------
>>> from stemgpu.app.steps import STEPS, check_steps, parse_step_names
>>> STEPS
('rigid', 'demons', 'atoms', 'cells')
>>> ALL_STEPS
('rigid', 'demons', 'atoms', 'cells', 'track')
>>> parse_step_names("cells, atoms")
('cells', 'atoms')
>>> check_steps(("cells", "atoms"))  # run order, dependencies checked
('atoms', 'cells')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ALL_STEPS", "ATOM_OPTIONS", "DRIFT_OPTIONS", "STEPS", "TRACK_OPTIONS",
           "check_options", "check_steps", "parse_step_names"]

#: The default stages, in the order they run.
STEPS = ("rigid", "demons", "atoms", "cells")
#: Every stage, in run order: ``"track"`` (every column in every frame) is asked for.
ALL_STEPS = (*STEPS, "track")

#: Options ``analyze(atoms={...})`` accepts (peak finding, species, O columns, fitting).
ATOM_OPTIONS = frozenset({"sigma", "threshold", "min_distance", "n_classes", "names",
                          "edge_columns", "model", "estimator", "window", "max_iter",
                          "counts_per_unit", "contrast"})
#: Options ``analyze(drift={...})`` accepts (passed to :func:`stemgpu.drift_report`).
DRIFT_OPTIONS = frozenset({"frame_time", "model", "degree", "smoothing"})
#: Options ``analyze(track={...})`` accepts (passed to :func:`stemgpu.track_columns`).
TRACK_OPTIONS = frozenset({"counts_per_unit", "estimator", "jump_z", "fade_z", "fade_fraction",
                           "erratic_p", "frame_z", "fail_fraction", "level", "batch_frames",
                           "engine", "min_cells", "alpha", "frames"})


def _unknown(steps: Sequence[str]) -> str | None:
    """The complaint about unknown or no stage names, or None when every name is a stage."""
    bad = [s for s in steps if s not in ALL_STEPS]
    if bad or not steps:
        return f"unknown step(s) {bad}; choose from {','.join(ALL_STEPS)}"
    return None


def parse_step_names(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of stage names, in the order given, checking each name.

    Raises
    ------
    ValueError
        A name that is not a stage, or no name at all.
    """
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    problem = _unknown(steps)
    if problem:
        raise ValueError(problem)
    return steps


def check_steps(steps: str | Sequence[str]) -> tuple[str, ...]:
    """The stages to run, in run order: names checked, no repeats, dependencies present.

    ``steps`` is a sequence of stage names or one comma-separated string.

    Raises
    ------
    TypeError
        ``steps`` is not a sequence.
    ValueError
        Unknown or repeated names, ``"cells"`` without ``"atoms"``, ``"demons"`` without
        ``"rigid"``.
    """
    if isinstance(steps, str):
        steps = tuple(s.strip() for s in steps.split(",") if s.strip())
    try:
        steps = tuple(steps)
    except TypeError:
        raise TypeError(f"steps must be a sequence of stage names; got {steps!r}") from None
    problem = _unknown(steps)
    if problem:
        raise ValueError(f"steps={steps!r}: {problem}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps={steps!r} names a stage twice")
    if "cells" in steps and "atoms" not in steps:
        raise ValueError("steps: 'cells' needs 'atoms' (cells are built from fitted columns)")
    if "demons" in steps and "rigid" not in steps:
        raise ValueError("steps: 'demons' needs 'rigid' first (demons corrects distortions "
                         "of a pixel or two, not frame offsets)")
    if "track" in steps and not {"rigid", "atoms"} <= set(steps):
        raise ValueError("steps: 'track' needs 'rigid' and 'atoms' (it fits the columns found "
                         "on the registered mean in every registered frame)")
    return tuple(s for s in ALL_STEPS if s in steps)


def check_options(stage_options: Mapping[str, Any]) -> dict[str, dict]:
    """The per-stage option dicts of ``analyze(**stage_options)``, checked and copied.

    Raises
    ------
    TypeError
        A keyword that is no stage (nor ``drift``), a value that is not a dict, or an
        unknown ``atoms`` / ``drift`` option.
    """
    allowed = (*ALL_STEPS, "drift")
    out = {}
    for key, value in stage_options.items():
        if key not in allowed:
            raise TypeError(f"analyze() got an unexpected keyword {key!r}; stage options are "
                            f"{allowed} (each a dict)")
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}= must be a dict of options for that stage; got "
                            f"{type(value).__name__}")
        out[key] = dict(value)
    for key, known in (("atoms", ATOM_OPTIONS), ("drift", DRIFT_OPTIONS),
                       ("track", TRACK_OPTIONS)):
        extra = set(out.get(key, {})) - known
        if extra:
            raise TypeError(f"{key}= has unknown option(s) {sorted(extra)}; accepted: "
                            f"{sorted(known)}")
    return out
