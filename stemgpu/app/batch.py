"""``stemgpu batch``: analyse many files, one results file each, and a summary of all.

Every input ``FILE`` gets ``OUT_DIR/<name>-stemgpu.h5`` (written by :func:`stemgpu.save`,
atomically: a temporary file renamed when complete) and one row in
``OUT_DIR/summary.csv``; the same table is printed. A file that fails is reported with its
reason (in its row and as one line on stderr) while the others go on; the exit code is then
:data:`EXIT_PARTIAL`. With ``resume=True`` a file whose results file is already complete
(:func:`stemgpu.io.results.is_results_file`) is not analysed again.

Files are analysed one after another in this process by default (no dask import); with
``scheduler=`` (see :mod:`stemgpu.app.distributed`) each file is one dask.distributed task.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Sequence

from .._progress import progress_bar
from .errors import EXIT_OK, EXIT_PARTIAL
from .steps import STEPS

__all__ = ["EXIT_PARTIAL", "SUMMARY_NAME", "analyse_file", "results_path", "run_batch"]

#: Exit code of ``stemgpu batch`` when at least one file failed (the others have results).
SUMMARY_NAME = "summary.csv"
_FIXED = ["file", "status", "results", "frames", "height", "width", "pixel_size_pm", "atoms",
          "converged", "seconds", "error"]


def results_path(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """``OUT_DIR/<name>-stemgpu.h5`` for input ``path``.

    Examples
    --------
    >>> from stemgpu.app.batch import results_path
    >>> results_path("/data/stack 1.ndata", "out").replace("\\\\", "/")
    'out/stack 1-stemgpu.h5'
    """
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return os.path.join(os.fspath(out_dir), f"{name}-stemgpu.h5")


def _reason(exc: BaseException) -> str:
    """One line, as the CLI words it (see ``stemgpu.app.cli``)."""
    from ..backend import BackendUnavailableError
    from .errors import AnalysisError

    text = " ".join(str(exc).split()).replace("pixel_size=", "--pixel-size ")
    if isinstance(exc, AnalysisError | BackendUnavailableError | ValueError | TypeError
                  | OSError):
        return text
    return f"internal error ({type(exc).__name__}: {text})"


def analyse_file(job: dict) -> dict:
    """Analyse one file and save its results: the file's summary row (never raises).

    ``job`` holds ``path``, ``out``, ``steps``, ``backend`` and ``pixel_size``. The row has
    ``status`` ``"ok"`` or ``"failed"`` (with ``error``), the shape, pixel size, fitted and
    converged columns, seconds, and every summary figure (``<name>`` and ``<name>_unc``).
    This is the task a dask worker runs in ``stemgpu batch --scheduler``.
    """
    from ..backend import to_host
    from ..io.results import save
    from .analysis import analyze
    from .run import _frame_source, _steps_for, read_input

    path, out = os.fspath(job["path"]), job["out"]
    row: dict = {"file": path, "results": out}
    t0 = time.perf_counter()
    source = None
    try:
        steps = tuple(job["steps"])
        pixel_size = job.get("pixel_size")
        if "rigid" in steps:  # streamed from disk through every step (as stemgpu run)
            source = _frame_source(path, pixel_size)
        ds = source if source is not None else read_input(path, pixel_size=pixel_size)
        steps = _steps_for(ds, steps, path, lambda *a, **k: None)
        shape = tuple(ds.shape)
        # A streamed demons step keeps its frames in a temporary store next to the results,
        # removed when the results are saved.
        with analyze(ds, pixel_size=pixel_size, steps=steps, backend=job.get("backend"),
                     progress=False,
                     scratch_dir=os.path.dirname(os.path.abspath(out))) as analysis:
            save(analysis, out, overwrite=True, source=path)
        if source is not None:
            source.close()
            source = None
    except Exception as exc:  # reported in the row; the other files go on
        if source is not None:
            source.close()
        row.update(status="failed", error=_reason(exc),
                   seconds=round(time.perf_counter() - t0, 3))
        return row
    row.update(status="ok", error="", frames=shape[0] if len(shape) == 3 else 1,
               height=shape[-2], width=shape[-1], pixel_size_pm=analysis.pixel_size_pm)
    if analysis.atoms is not None:
        ok = to_host(analysis.atoms.status) == 0
        row.update(atoms=int(ok.size), converged=int(ok.sum()))
        if not ok.any():
            row.update(status="failed", error="no atom column fit converged")
    for name, r in analysis.summary().items():
        row[name] = r.value
        row[f"{name}_unc"] = r.total_uncertainty
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _previous_rows(summary: str) -> dict[str, dict]:
    """Rows of an earlier summary.csv by file (for files a resumed run skips)."""
    try:
        with open(summary, newline="") as fh:
            return {os.path.abspath(r["file"]): r for r in csv.DictReader(fh)}
    except (OSError, csv.Error, KeyError):
        return {}


def _write_csv(rows: list[dict], path: str) -> None:
    columns = list(_FIXED)
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _format_table(rows: list[dict]) -> str:
    from .table import format_number

    head = ["file", "status", "frames", "pm/px", "columns", "seconds", "results / error"]
    lines = []
    for r in rows:
        px = r.get("pixel_size_pm")
        cols = (f"{r['converged']}/{r['atoms']}"
                if r.get("atoms") not in (None, "") else "")
        lines.append([os.path.basename(r["file"]), r["status"], str(r.get("frames", "")),
                      format_number(float(px)) if px not in (None, "") else "", cols,
                      str(r.get("seconds", "")),
                      r["error"] if r.get("error") else os.path.basename(r["results"])])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    return "\n".join(out)


def run_batch(files: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike,
              scheduler=None, workers: int | None = None, resume: bool = False,
              steps: Sequence[str] = STEPS, backend=None, pixel_size: float | None = None,
              quiet: bool = False) -> int:
    """``stemgpu batch``: analyse ``files``, write their results and the summary table.

    Parameters
    ----------
    files : sequence of paths
    out_dir : path
        Created when missing; receives ``<name>-stemgpu.h5`` per input and ``summary.csv``.
    scheduler : {None, "local", "local-cuda"}, str or distributed.Client
        None: one file after another in this process. Otherwise one dask.distributed task
        per file (see :func:`stemgpu.app.distributed.cluster_client`).
    workers : int, optional
        Worker processes of a cluster started for ``"local"`` / ``"local-cuda"``.
    resume : bool
        Skip files whose results file is complete (their row comes from the previous
        ``summary.csv`` when it has one).
    steps, backend, pixel_size, quiet
        As ``stemgpu run``.

    Returns
    -------
    int
        0 when every file has results, :data:`EXIT_PARTIAL` (5) when some failed.

    Raises
    ------
    ValueError
        No files, or two inputs that would write the same results file.
    FileNotFoundError, NotADirectoryError
        ``out_dir`` cannot be created or is a file.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from stemgpu.app.batch import run_batch
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "bad.ndata"), "wb") as fh:
    ...     _ = fh.write(b"not a Nion file")
    >>> run_batch([os.path.join(d, "bad.ndata")], out_dir=os.path.join(d, "out"),
    ...           quiet=True)  # the reason goes to stderr and summary.csv
    5
    >>> sorted(os.listdir(os.path.join(d, "out")))
    ['summary.csv']
    """
    from ..io.results import is_results_file

    say = (lambda *a, **k: None) if quiet else print
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("batch needs at least one input file")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out-dir {out_dir}: is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    outs = [results_path(f, out_dir) for f in files]
    seen: dict[str, str] = {}
    for f, o in zip(files, outs, strict=True):
        if o in seen:
            raise ValueError(f"{seen[o]} and {f} would both write {o}; give inputs distinct "
                             "names (or run them into different --out-dir folders)")
        seen[o] = f
    summary = os.path.join(out_dir, SUMMARY_NAME)
    previous = _previous_rows(summary) if resume else {}
    rows: list[dict | None] = [None] * len(files)
    jobs = []
    for i, (f, o) in enumerate(zip(files, outs, strict=True)):
        if resume and is_results_file(o):
            old = previous.get(os.path.abspath(f))
            rows[i] = dict(old, file=f) if old else {"file": f, "status": "ok", "results": o,
                                                      "error": ""}
            rows[i]["resumed"] = "yes"
            continue
        jobs.append((i, {"path": f, "out": o, "steps": tuple(steps), "backend": backend,
                         "pixel_size": pixel_size}))
    if resume:
        say(f"batch: {len(files) - len(jobs)} of {len(files)} file(s) already done, "
            f"{len(jobs)} to analyse")
    if jobs and scheduler is None:
        bar = progress_bar(not quiet, total=len(jobs), desc="batch", unit="file")
        try:
            for i, job in jobs:
                rows[i] = analyse_file(job)
                bar.update(1)
        finally:
            bar.close()
    elif jobs:
        from .distributed import cluster_client, map_bounded

        def lost(job, exc):  # the task never returned a row: its worker died every time
            return {"file": job["path"], "results": job["out"], "status": "failed",
                    "error": f"the worker analysing it died ({type(exc).__name__}: {exc})"}

        with cluster_client(scheduler, workers=workers, say=say) as client:
            done = map_bounded(client, analyse_file, [job for _, job in jobs],
                               label=lambda job: job["path"], stage="batch",
                               progress=not quiet, on_error=lost)
        for (i, _), row in zip(jobs, done, strict=True):
            rows[i] = row
    final = [r for r in rows if r is not None]
    _write_csv(final, summary)
    say(_format_table(final))
    say(f"summary: {os.path.abspath(summary)}")
    failed = [r for r in final if r["status"] != "ok"]
    for r in failed:
        print(f"stemgpu: {r['file']}: {r['error']}", file=sys.stderr)
    if failed:
        say(f"batch: {len(failed)} of {len(final)} file(s) failed")
        return EXIT_PARTIAL
    return EXIT_OK
