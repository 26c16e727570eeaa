"""``stemgpu run``: read a microscope file, analyse it, print the summary, save the results."""

from __future__ import annotations

import contextlib
import os
import sys

from .errors import EXIT_FAILED, EXIT_OK
from .paths import check_output_paths
from .steps import STEPS

__all__ = ["read_input", "run_file"]


def read_input(path: str, *, pixel_size: float | None = None):
    """Open ``path`` as a calibrated sidpy Dataset: whatever :func:`stemgpu.open` reads (Nion
    ``.ndata``/``.ndata1``/``.h5``/``.nhdf``/TIFF, pyNSID HDF5, other formats through
    RosettaSciIO).

    Raises ``ValueError`` with a one-line message naming the file for anything else
    (``FileNotFoundError`` / ``IsADirectoryError`` for a missing file or a folder).
    """
    from ..io.nion import open as open_file
    from ..io.results import is_results_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a data file")
    if is_results_file(path):
        raise ValueError(f"{path}: a stemgpu results file (written by stemgpu.save), not "
                         "microscope data; open it with stemgpu.load in Python")
    return open_file(path, lazy=False, pixel_size=pixel_size)


def _frame_source(path: str, pixel_size):
    """A lazy Nion stack of >= 3 frames (streamed by rigid registration), else None."""
    from ..io.nion import NionFormatError, open_frames

    if not os.path.isfile(path):
        return None  # read_input reports missing files, folders and results files
    try:
        source = open_frames(path, pixel_size=pixel_size)
    except (NionFormatError, ValueError, OSError):
        return None  # read_input reports the problem in its own words
    if len(source.shape) != 3 or source.shape[0] < 3:
        source.close()
        return None
    return source


def _steps_for(ds, steps: tuple[str, ...], path, say) -> tuple[str, ...]:
    """The steps the data allows: a single image drops the registration steps."""
    if ds.ndim == 2 and {"rigid", "demons"} & set(steps):
        steps = tuple(s for s in steps if s not in ("rigid", "demons"))
        say(f"{path}: a single image; running {', '.join(steps) or 'nothing'}")
        if not steps:
            raise ValueError("--steps: rigid/demons need an image stack; this file holds one "
                             "image")
    if ds.ndim == 3 and ds.shape[0] < 3 and "rigid" in steps:
        raise ValueError(f"{path}: {ds.shape[0]} frame(s); rigid registration needs at least 3 "
                         "(use --steps atoms,cells to fit the mean of these frames)")
    return steps


def run_file(path, *, out=None, backend=None, steps=STEPS, pixel_size=None,
             quiet=False, figure=None, contrast="bright", scheduler=None,
             workers=None) -> int:
    """``stemgpu run``: analyse a file, print the summary, save results; returns exit code.

    ``contrast`` (``--contrast``): ``"bright"``, ``"dark"`` or ``"auto"``, as
    ``analyze(atoms={"contrast": ...})``; what ``"auto"`` chose is printed.

    A Nion stack of 3 or more frames is streamed from disk (never loaded whole) when the
    steps include ``"rigid"``: rigid registration keeps only the mean, demons writes its
    registered frames and fields to a temporary store next to ``out`` (removed at the end),
    and the results file is written from that store chunk by chunk.

    ``scheduler`` (``--scheduler``): ``"local"``, ``"local-cuda"``, a scheduler address or
    scheduler file, as ``analyze(client=...)``: rigid, demons and tracking batches run as
    dask.distributed tasks (``workers``: worker processes of a local cluster); the
    dashboard address of a cluster started here is printed.
    """
    from .._checks import check_choice

    check_choice(contrast, "contrast", ("bright", "dark", "auto"))
    from .analysis import analyze

    say = print if not quiet else (lambda *a, **k: None)
    out = out or os.path.splitext(os.fspath(path))[0] + "-stemgpu.h5"
    if os.path.abspath(out) == os.path.abspath(os.fspath(path)):
        raise ValueError(f"--out {out}: would overwrite the input file")
    check_output_paths(out, figure)
    steps = tuple(steps)
    source = _frame_source(os.fspath(path), pixel_size) if "rigid" in steps else None
    ds = source if source is not None else read_input(os.fspath(path), pixel_size=pixel_size)
    try:
        steps = _steps_for(ds, steps, path, say)
        if source is not None:
            kept = ("the demons frames go to a temporary store next to the results"
                    if "demons" in steps else "only the registered mean is kept")
            say(f"{path}: streaming the frames from disk ({kept})")
        atoms = {"contrast": contrast} if "atoms" in steps and contrast != "bright" else {}
        kw = {"atoms": atoms} if atoms else {}
        if scheduler is not None:
            from .distributed import cluster_client

            cluster = cluster_client(scheduler, workers=workers, say=say)
        else:
            cluster = contextlib.nullcontext()  # client None: everything in this process
        with cluster as client:
            analysis = analyze(ds, pixel_size=pixel_size, steps=steps, backend=backend,
                               progress=not quiet, client=client,
                               scratch_dir=os.path.dirname(os.path.abspath(out)), **kw)
    except BaseException:
        if source is not None:
            source.close()
        raise
    with analysis:  # removes the demons frame store of a streamed run when done
        try:
            return _report(analysis, ds, path, out, figure, say)
        finally:
            if source is not None:
                source.close()


def _report(analysis, ds, path, out, figure, say) -> int:
    """Print the summary, save the results and the figure; the exit code."""
    from ..backend import to_host
    from ..io.results import save
    from .report import save_report

    say(f"{path}: {tuple(ds.shape)} at {analysis.pixel_size_pm:g} pm/px")
    if analysis.atoms is not None and "contrast_note" in analysis.atoms.parameters:
        say(f"{path}: {analysis.atoms.parameters['contrast_note']}")
    say(analysis.summary(as_text=True))
    save(analysis, out, overwrite=True, source=os.fspath(path))
    say(f"results: {os.path.abspath(out)}")
    if figure:
        say(f"report figure: {save_report(analysis, figure)}")
    if analysis.atoms is not None:
        ok = to_host(analysis.atoms.status) == 0
        if not ok.any():
            print(f"stemgpu: {path}: no atom column fit converged", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK
