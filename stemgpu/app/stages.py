"""The stages of :func:`stemgpu.analyze`, one function each, on the results of the earlier ones.

``prepare_input`` (validation, calibration, backend) -> ``rigid_stage`` (registration and
drift; a lazy stack is streamed and only its registered mean kept) -> ``demons_stage`` (a
streamed stack: ``streamed_demons_stage``, batch by batch into a temporary frame store) ->
``registered_mean`` -> ``atoms_stage`` (find, fit, label, O columns, refit) -> ``cells_stage``
(unit cells and their statistics). Each raises :class:`~stemgpu.app.errors.AnalysisError`
when it ran but found nothing usable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._inputs import as_image, as_stack, is_frame_source, is_sidpy_dataset, resolve_pixel_size
from ..backend import Backend, resolve_backend, to_host
from .errors import AnalysisError

__all__ = ["DEMONS_BATCH_BYTES", "DEMONS_BYTES_PER_PIXEL", "STREAM_BATCH_BYTES", "Prepared",
           "RegisteredFrames",
           "atoms_stage", "cells_stage", "demons_batch_size", "demons_stage", "prepare_input",
           "registered_mean", "rigid_stage", "streamed_demons_stage", "track_stage"]

_FIT_OPTIONS = ("model", "estimator", "window", "max_iter", "counts_per_unit")
_A_CELL_OPTIONS = ("angle_tolerance_deg", "side_tolerance", "parallelogram_tolerance")


@dataclass(frozen=True)
class Prepared:
    """The validated input of an analysis."""

    data: Any  #: the stack or image on the backend, or the lazy frame source itself
    backend: Backend
    pixel_size_pm: float
    shape: tuple[int, ...]
    frame_time_s: float | None
    streamed: bool  #: a lazy source, streamed batch by batch through rigid and demons


# ---------------------------------------------------------------------------- input


def prepare_input(stack, steps, pixel_size, backend) -> Prepared:
    """Check the data against the steps, find its calibration and frame time, pick the backend."""
    frame_time = frame_time_of(stack) if is_sidpy_dataset(stack) else None
    ndim = len(getattr(stack, "shape", np.shape(stack)))
    if is_frame_source(stack):
        be, px, frame_time = _check_frame_source(stack, steps, pixel_size, backend)
        return Prepared(stack, be, px, tuple(int(x) for x in stack.shape), frame_time, True)
    if ndim == 2:
        if {"rigid", "demons"} & set(steps):
            raise ValueError("steps 'rigid'/'demons' need a stack (frames, rows, cols); "
                             "got a single image: use steps=('atoms', 'cells')")
        cal = as_image(stack, name="stack", backend=backend)
    else:
        cal = as_stack(stack, name="stack", min_frames=1 if "rigid" not in steps else 3,
                       backend=backend)
    px = resolve_pixel_size(pixel_size, cal.pixel_size_pm, required=True, what="analyze")
    return Prepared(cal.data, cal.backend, px, tuple(int(x) for x in cal.data.shape),
                    frame_time, False)


def _check_frame_source(stack, steps, pixel_size, backend):
    if len(stack.shape) != 3:
        raise ValueError(f"stack: a lazy source must be a (frames, rows, cols) stack; got "
                         f"shape {tuple(stack.shape)}")
    if "rigid" not in steps:
        raise ValueError("steps: a lazy stack (e.g. stemgpu.open_frames) is analysed by "
                         "streaming it through 'rigid' (and 'demons'), which gives the "
                         "registered mean the later steps use: include 'rigid' (e.g. "
                         "('rigid', 'atoms', 'cells')), or load it into memory first")
    px = resolve_pixel_size(pixel_size, getattr(stack, "pixel_size_pm", None), required=True,
                            what="analyze")
    meta = dict(getattr(stack, "metadata", {}) or {})
    frame_time = meta.get("frame_time_s")
    return resolve_backend(backend), px, (float(frame_time) if frame_time else None)


def frame_time_of(dataset) -> float | None:
    """Frame time (s) of a sidpy stack: its metadata, else a frame axis calibrated in s."""
    meta = dict(getattr(dataset, "metadata", {}) or {})
    if meta.get("frame_time_s"):
        return float(meta["frame_time_s"])
    if getattr(dataset, "ndim", 0) != 3:
        return None
    try:
        axis = dataset._axes[0]
        unit = str(getattr(axis, "units", "")).strip().lower()
        values = np.asarray(axis.values, dtype=float)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if unit in ("s", "sec", "second", "seconds") and len(values) > 1:
        step = float(np.median(np.diff(values)))
        return step if np.isfinite(step) and step > 0 else None
    return None


# ---------------------------------------------------------------------------- registration


def rigid_stage(prep: Prepared, options: Mapping[str, Any], drift_options: Mapping[str, Any],
                progress: bool, client=None, streamed_mean: bool = True):
    """Rigid registration onto the mean and the drift report.

    Returns ``(rigid, drift, registered, flagged)``: the registered stack (or, for a
    streamed source, the mean of its unflagged registered frames, with ``flagged`` None;
    None with ``streamed_mean=False``, when a streamed demons step makes its own mean and
    a pass over the stack for this one would be wasted).
    With a ``client`` (a ``distributed.Client``) the frame batches are dask tasks.
    """
    from ..registration.drift import drift_report
    from ..registration.rigid import register_rigid

    be = prep.backend
    options = dict(options)
    if prep.streamed and not be.is_gpu and "batch_size" not in options:
        # a streamed stack may be larger than memory: batches from the streaming budget
        from ..registration.rigid import BYTES_PER_PIXEL

        options["batch_size"] = be.frames_per_batch(prep.shape, BYTES_PER_PIXEL,
                                                    cpu_cap=STREAM_BATCH_BYTES,
                                                    max_frames=64)
    if client is None:
        register = register_rigid
    else:
        from functools import partial

        from .distributed import register_rigid_on

        register = partial(register_rigid_on, client)
    rigid = register(prep.data, pixel_size=prep.pixel_size_pm, progress=progress,
                     backend=be, **{"keep_registered": not prep.streamed, **options})
    flagged = to_host(rigid.flagged).astype(bool)
    if (~flagged).sum() < 3:
        raise AnalysisError(
            f"rigid: {int(flagged.sum())} of {len(flagged)} frames were flagged as failed "
            "registrations; fewer than 3 usable frames are left for the drift fit")
    drift = drift_report(rigid, **{"frame_time": prep.frame_time_s, **drift_options})
    if prep.streamed:
        # Nothing but the mean is kept: the stack may be larger than memory.
        mean = _streamed_mean(prep.data, rigid, be, flagged) if streamed_mean else None
        return rigid, drift, mean, None
    return rigid, drift, rigid.registered, flagged


def _streamed_mean(stack, rigid, be, flagged):
    """Mean of the registered frames that were not flagged, read and shifted batch by batch."""
    from ..registration.rigid import apply_shifts

    if not flagged.any():
        return be.asarray(rigid.mean)
    xp = be.xp
    n = int(stack.shape[0])
    shifts = np.asarray(rigid.shifts, dtype=float)
    order = rigid.parameters.get("order", "fourier")
    batch = max(1, int(rigid.parameters.get("batch_size") or 8))
    acc = None
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        keep = np.flatnonzero(~flagged[start:stop])
        if len(keep) == 0:
            continue
        frames = np.asarray(stack[start:stop], dtype=np.float32)[keep]
        moved = apply_shifts(frames, shifts[start + keep], order=order, backend=be)
        part = moved.sum(axis=0, dtype=xp.float64)
        acc = part if acc is None else acc + part
    return (acc / float((~flagged).sum())).astype(xp.float32)


def demons_stage(registered, flagged, be: Backend, options: Mapping[str, Any], progress: bool):
    """Demons registration of the rigidly registered frames onto their mean.

    Failed frames stay out of the demons reference and of the mean. Returns
    ``(demons, kept)``: ``kept`` lists the frames registered when some were left out, else
    None.
    """
    from ..registration.demons import register_demons

    kept = None
    if flagged is not None and flagged.any():
        kept = np.flatnonzero(~flagged)
        registered = registered[be.asarray(kept)]
        kept = kept.tolist()
    demons = register_demons(registered, progress=progress, backend=be, **options)
    return demons, kept


#: Host memory per frame pixel of one streamed demons batch: the raw and rigidly shifted
#: frames with their padded Fourier shift, demons' own working arrays (it states 160 B/px)
#: and the host copies of the registered frame and field written to the store.
DEMONS_BYTES_PER_PIXEL = 224
#: Host memory one streamed demons batch may use on the CPU (the GPU takes a third of its
#: free memory, as register_demons does).
DEMONS_BATCH_BYTES = 128 * 2**20
#: Host memory one rigid batch of a streamed stack may use on the CPU (register_rigid's own
#: "auto" allows 256 MiB, more than a stack twice the memory limit leaves).
STREAM_BATCH_BYTES = 64 * 2**20


def demons_batch_size(shape, be: Backend, batch_size="auto") -> int:
    """Frames per streamed demons batch: ``batch_size``, or what the memory budget allows.

    On the CPU a batch holds at most :data:`DEMONS_BATCH_BYTES` (and an eighth of the
    available memory) at :data:`DEMONS_BYTES_PER_PIXEL`; on a GPU a third of its free
    memory. At least one frame, and at least one frame per CPU core when that fits twice
    the budget (the cores then share a batch).
    """
    n = be.frames_per_batch(shape, DEMONS_BYTES_PER_PIXEL, batch_size=batch_size,
                            gpu_fraction=1 / 3, cpu_fraction=0.125,
                            cpu_cap=DEMONS_BATCH_BYTES)
    if batch_size == "auto" and not be.is_gpu:
        per_frame = DEMONS_BYTES_PER_PIXEL * int(shape[-2]) * int(shape[-1])
        cores = max(1, int(be.cpu_workers))
        if n < cores and cores * per_frame <= 2 * DEMONS_BATCH_BYTES:
            n = min(int(shape[0]), cores)
    return int(n)


def _sum_in_order(acc, frames):
    """``acc + frames[0] + frames[1] + ...`` in this order, in ``acc``'s dtype.

    NumPy sums a stack over its frame axis one frame after the other, so adding batch after
    batch this way gives the very bits of ``stack.sum(axis=0)`` (``stack.mean(axis=0)``
    divides that by n): a streamed mean equals the in-memory one exactly.
    """
    if len(frames) == 0:
        return acc
    return np.concatenate([acc[None], frames.astype(acc.dtype, copy=False)]).sum(axis=0)


class _DemonsPass:
    """One pass of streamed demons over every batch: what the stage keeps of each batch.

    The per-frame records (metrics, iterations, flags, histories) are small and kept in
    memory; the registered frames go to the store (the fields only on the last pass, with
    ``keep_fields``); the sums of the registered frames (all of them, and the unflagged
    ones) are float32, added frame after frame in frame order, the order and precision of
    ``register_demons`` and ``registered.mean(axis=0)`` in memory (so the streamed means
    are bit-identical to them).
    """

    def __init__(self, n, shape, store, keep_fields):
        self.n, self.store, self.keep_fields = n, store, keep_fields
        self.sum_all = np.zeros(shape, dtype=np.float32)
        self.sum_good = np.zeros(shape, dtype=np.float32)
        self.records: list = []
        self.bad = np.zeros(n, dtype=bool)
        self._next = 0  # first frame whose batch is not yet in the sums
        self._ready: dict = {}  # start -> stop of batches written, not yet summed

    def add(self, start, res) -> None:
        """Batch ``res`` (a :class:`DemonsResult` of host arrays) of frames ``start:``.

        Batches may arrive in any order (dask tasks): each is written to the store at
        once and summed when every earlier batch is (read back from the store when it came
        early), so the means do not depend on which finished first.
        """
        start = int(start)
        reg = np.asarray(res.registered)
        bad = np.asarray(res.flagged, dtype=bool)
        stop = start + len(reg)
        self.bad[start:stop] = bad
        self.store.write("registered", start, reg)
        if self.keep_fields:
            self.store.write("displacement", start, np.asarray(res.displacement))
        self.records.append((start, res.metric_before, res.metric_after, res.metric_history,
                             res.update_history, res.iterations, bad, res.parameters))
        self._ready[start] = stop
        while self._next in self._ready:
            a = self._next
            b = self._ready.pop(a)
            frames = reg if a == start else self.store.read("registered", a, b)
            self.sum_all = _sum_in_order(self.sum_all, frames)
            self.sum_good = _sum_in_order(self.sum_good, frames[~self.bad[a:b]])
            self._next = b

    def merged(self):
        """The per-frame records in frame order, and the batch size register_demons used."""
        recs = sorted(self.records, key=lambda r: r[0])
        cat = [np.concatenate([np.asarray(r[k]) for r in recs], axis=-1) for k in range(1, 7)]
        return cat, recs[0][7]


def _demons_on_batch(frames, start, stop, reference, options, backend):
    """``register_demons`` of frames ``start:stop`` of ``frames`` onto ``reference``
    (host arrays out): the unit of work of the streamed demons stage, in process or as a
    dask task (``frames`` then pickles to a file reference and is read in the worker)."""
    from ..backend import resolve_backend
    from ..registration.demons import register_demons

    be = resolve_backend(backend)
    raw = frames[start:stop]
    res = register_demons(raw, reference=reference, progress=False, backend=be, **options)
    return res.to_numpy()


def _frames_mean(frames, batch, progress, progress_bar):
    """``frames[:].mean(axis=0)`` (float32) read batch by batch: the same bits."""
    n, h, w = frames.shape
    acc = np.zeros((h, w), dtype=np.float32)
    starts = range(0, n, batch)
    bar = progress_bar(progress, total=len(starts), desc="demons reference", unit="batch",
                       leave=False)
    try:
        for a in starts:
            acc = _sum_in_order(acc, frames[a:a + batch])
            bar.update(1)
    finally:
        bar.close()
    return acc / n


def streamed_demons_stage(prep: Prepared, rigid, options: Mapping[str, Any],
                          progress: bool, *, store_dir=None, client=None):
    """Demons registration of a streamed stack, frame batch by frame batch.

    The rigidly registered frames are read from the lazy source and shifted one batch at a
    time (:class:`RegisteredFrames`; frames flagged by rigid registration stay out, as in
    memory). A first pass sums them into their float32 mean, the reference
    ``register_demons`` makes of an in-memory stack; then each batch is registered onto it
    with ``register_demons(batch, reference=mean)`` (each frame depends only on itself and
    the reference), and the registered frames (and, with ``keep_fields``, the displacement
    fields) are written to a :class:`~stemgpu.io.store.FrameStore` in ``store_dir``.
    ``rounds > 1`` (without a ``reference`` option) re-averages the reference from the
    unflagged registered frames between passes, as ``register_demons`` does. Every sum is
    added frame after frame in frame order, in float32, as NumPy sums an in-memory stack,
    so on NumPy the result is bit-identical to ``register_demons`` of the whole registered
    stack. Nothing but a few batches, the reference and two sums is in memory at a time.

    With a ``client`` each batch is a dask task that reads its own frames (at most
    ``INFLIGHT`` per worker); the client writes the store.

    Returns ``(demons, kept, mean_image)``: a ``DemonsResult`` whose ``registered`` and
    ``displacement`` are lazy store-backed frame sources, the frames registered when rigid
    flagged some (else None), and the float32 mean of all registered frames (what the
    atom stage fits, as ``registered.mean(axis=0)`` in memory).
    """
    from .._progress import progress_bar
    from ..io.store import FrameStore
    from ..registration.demons import DemonsResult

    be = prep.backend
    flagged = to_host(rigid.flagged).astype(bool)
    keep = np.flatnonzero(~flagged)
    frames = RegisteredFrames(prep.data, rigid.shifts, rigid.parameters.get(
        "order", "fourier"), keep, be, batch=rigid.parameters.get("batch_size"))
    n, h, w = frames.shape
    opts = dict(options)
    batch = demons_batch_size(frames.shape, be, opts.pop("batch_size", "auto"))
    from .._checks import check_int

    rounds = check_int(opts.pop("rounds", 1), "rounds", minimum=1, maximum=100)
    if "reference" in opts:  # as register_demons: a given reference is one round
        rounds = 1
    keep_fields = opts.get("keep_fields", True)
    given = opts.pop("reference", None)
    ranges = [(a, min(n, a + batch)) for a in range(0, n, batch)]
    opts_b = {**opts, "batch_size": batch}
    store = FrameStore(store_dir)
    try:
        ref = np.asarray(to_host(given), dtype=np.float32) if given is not None \
            else _frames_mean(frames, batch, progress, progress_bar)
        store.create("registered", (n, h, w), np.float32)
        if keep_fields is True:
            store.create("displacement", (n, 2, h, w), np.float32)
        hists: list = []
        for rnd in range(rounds):
            last = rnd + 1 == rounds
            run = _DemonsPass(n, (h, w), store, last and keep_fields is True)
            desc = "demons" if rounds == 1 else f"demons round {rnd + 1}/{rounds}"
            _run_demons_pass(run, frames, ranges, ref, opts_b, be, progress, desc, client,
                             progress_bar)
            (before, after, hist_m, hist_u, iters, bad), params = run.merged()
            hists.append((hist_m, hist_u))  # (1, levels, iterations, n) each
            n_good = int((~bad).sum())
            new_mean = run.sum_good / np.int64(max(n_good, 1))  # float64, as in memory
            if not last:
                ref = new_mean.astype(np.float32)
        store.finish()
    except BaseException:
        store.close()
        raise
    params = {**params, "rounds": rounds, "batch_size": batch, "streamed": True,
              "reference": "given" if given is not None else "mean",
              "backend": be.name}
    demons = DemonsResult(
        registered=store.array("registered"),
        displacement=store.array("displacement") if keep_fields is True else None,
        reference=be.asarray(ref), mean=be.asarray(new_mean),
        metric_before=be.asarray(before), metric_after=be.asarray(after),
        metric_history=be.asarray(np.concatenate([m for m, _ in hists])),
        update_history=be.asarray(np.concatenate([u for _, u in hists])),
        iterations=be.asarray(iters), flagged=be.asarray(bad), parameters=params)
    mean_image = be.asarray((run.sum_all / n).astype(np.float32))
    kept = keep.tolist() if flagged.any() else None
    return demons, kept, mean_image, store


def _run_demons_pass(run, frames, ranges, ref, opts, be, progress, desc, client,
                     progress_bar):
    if client is None:
        bar = progress_bar(progress, total=len(ranges), desc=desc, unit="batch", leave=False)
        try:
            for a, b in ranges:
                run.add(a, _demons_on_batch(frames, a, b, ref, opts, be.name))
                bar.update(1)
        finally:
            bar.close()
        return
    from .distributed import demons_batches_on

    demons_batches_on(client, run, frames, ranges, ref, opts, be.name, progress, desc,
                      _demons_on_batch)


def registered_mean(current, flagged, be: Backend):
    """The float32 mean of the unflagged registered frames (an image passes through)."""
    xp = be.xp
    if current.ndim == 3:
        keep = np.ones(current.shape[0], dtype=bool) if flagged is None else ~flagged
        mean = current[be.asarray(np.flatnonzero(keep))].mean(axis=0) if not keep.all() \
            else current.mean(axis=0)
    else:
        mean = current
    # A copy: a float32 image passed to analyze would otherwise come back as mean_image
    # itself, and editing one would change the other.
    return xp.array(mean, dtype=xp.float32, copy=True)


# ---------------------------------------------------------------------------- columns, cells


def _fit_options(options: Mapping[str, Any]) -> dict:
    return {k: options[k] for k in _FIT_OPTIONS if k in options}


def _find_and_fit(image, options: Mapping[str, Any], be, n_classes: int):
    """Peaks, then a first fit of every column; returns (start, fit, fit keywords, sigma)."""
    from ..atoms.find import find_atoms
    from ..atoms.fit import fit_atoms

    found = find_atoms(image, sigma=options.get("sigma"),
                       threshold=options.get("threshold", 0.03),
                       min_distance=options.get("min_distance"),
                       contrast=options.get("contrast", "bright"), backend=be)
    start = to_host(found.positions)
    if len(start) < max(4, n_classes):
        raise AnalysisError(f"atoms: found {len(start)} column(s) in the registered mean; need at "
                            "least 4 (check pixel_size and the contrast, or pass "
                            "atoms={'sigma': ..., 'threshold': ..., 'contrast': ...})")
    sigma = float(found.sigma)
    # No nested bar per fitting pass: the stage bar says "atom columns" already. The fits
    # model the contrast find_atoms searched for (peaks, or dips for ABF / BF).
    fit_kw = {"sigma": sigma, "backend": be, **_fit_options(options),
              "contrast": found.contrast}
    first = fit_atoms(image, start, **fit_kw)
    # What "auto" chose, and on which evidence, for the record of the fit (and the summary).
    first.parameters.update(_contrast_record(found))
    ok = to_host(first.status) == 0
    if ok.sum() < max(4, n_classes):
        hint = ""
        if float(image.min()) < 0:
            hint = ("; the image has negative values (offset-corrected data?): the Poisson "
                    "fit needs counts - add the dark level back")
        elif found.parameters.get("contrast_chosen") != "auto":
            hint = (f"; the columns were fitted as {_CONTRAST_WORDS[found.contrast]}: check "
                    "the contrast (atoms={'contrast': 'dark'} for ABF/BF, 'auto' to choose "
                    "from the image)")
        raise AnalysisError(f"atoms: only {int(ok.sum())} of {len(ok)} column fits converged "
                            f"({first.status_counts()}){hint}")
    return start, first, fit_kw, sigma


_CONTRAST_WORDS = {"bright": "bright peaks (HAADF/ADF)", "dark": "dark dips (ABF/BF)"}


def _contrast_record(found) -> dict:
    """``contrast``, ``contrast_chosen`` and (for ``"auto"``) ``contrast_scores`` of the search,
    and a sentence for the summary's notes."""
    chosen = found.parameters.get("contrast_chosen", "given")
    rec = {"contrast": found.contrast, "contrast_chosen": chosen}
    note = f"columns fitted as {_CONTRAST_WORDS[found.contrast]}"
    scores = found.parameters.get("contrast_scores")
    if chosen == "auto" and scores:
        rec["contrast_scores"] = dict(scores)
        weak, strong = sorted(scores.values())
        ratio = strong / weak if weak > 0 else float("inf")
        note += (f", chosen from the image (contrast='auto': dip/peak LoG score ratio "
                 f"{scores['dark'] / scores['bright']:.2f})" if scores["bright"] > 0
                 else ", chosen from the image (contrast='auto')")
        if ratio < 1.2:
            note += "; the choice was close: check it, or give contrast="
    rec["contrast_note"] = note
    return rec


def _contrast_hint(fit) -> str:
    """The contrast the columns were fitted with, for an error message."""
    c = fit.parameters.get("contrast", "bright")
    how = " (chosen by contrast='auto')" if fit.parameters.get("contrast_chosen") == "auto" \
        else ""
    other = "dark" if c == "bright" else "bright"
    return (f"; the columns were fitted as {_CONTRAST_WORDS[c]}{how}: check the contrast "
            f"(atoms={{'contrast': '{other}'}} if the columns are {_CONTRAST_WORDS[other]})")


def atoms_stage(image, options: Mapping[str, Any], be, *, cells_options):
    """Find, fit, label; then add the perovskite O columns and refit all together.

    ``options["contrast"]`` (``"bright"``, ``"dark"`` or ``"auto"``) is the contrast
    :func:`~stemgpu.find_atoms` searches for and :func:`~stemgpu.fit_atoms` models; the fit's
    ``parameters`` record it (``contrast``, ``contrast_chosen``, ``contrast_scores`` for
    ``"auto"``, and ``contrast_note``: a sentence for the summary). Dark contrast (ABF / BF)
    shows the O columns of a perovskite as dips of their own, so its default
    ``n_classes`` is 3 (classes ``A``, ``B``, ``O`` by dip depth, no O columns placed);
    bright contrast keeps 2 (A, B; the O columns placed at the A-A edge midpoints).
    Returns ``(fit, species)``.
    """
    from ..atoms.fit import fit_atoms
    from ..lattice.perovskite import CELL_TOLERANCES, place_o_columns
    from ..lattice.sublattice import assign_by_intensity

    names = options.get("names")
    start, first, fit_kw, sigma = _find_and_fit(image, options, be,
                                                int(options.get("n_classes", 2)))
    n_classes = int(options.get("n_classes", 2))
    if "n_classes" not in options and first.parameters.get("contrast") == "dark":
        n_classes = len(names) if names else 3
    ok = to_host(first.status) == 0
    pos = to_host(first.positions)
    amp = to_host(first.param("amplitude"))
    labels = np.full(len(pos), "-", dtype=object)
    try:
        labels[ok] = assign_by_intensity(amp[ok], n_classes=n_classes, names=names)
    except AnalysisError as exc:
        raise AnalysisError(f"atoms: {exc}{_contrast_hint(first)}") from None
    labels = labels.astype(str)
    lattice = cells_options.get("lattice", "perovskite")
    other = isinstance(lattice, str) and lattice != "perovskite"  # hexagonal / generic
    if not options.get("edge_columns", True) or n_classes != 2 or other:
        return first, labels
    a_name = names[0] if names else "A"
    a_ok = ok & (labels == a_name)
    # The O columns sit at the edge midpoints of the A-site cells.
    try:
        mids = place_o_columns(pos[a_ok], merge_distance=0.25 * sigma + 0.5,
                               **{k: v for k, v in cells_options.items()
                                  if k in CELL_TOLERANCES})
    except ValueError:
        return first, labels  # no square A-site lattice: nothing to complete
    if len(mids) == 0:
        return first, labels
    # Start the known columns from their first-pass fits (failed ones from the peak).
    start2 = np.where(np.isfinite(pos), pos, start)
    allpos = np.concatenate([start2, mids])
    all_labels = np.concatenate([labels, np.full(len(mids), "O")])
    second = fit_atoms(image, allpos, **fit_kw)
    second.parameters.update({k: v for k, v in first.parameters.items()
                              if k.startswith("contrast")})
    return second, all_labels


def cells_stage(fit, species, px, options, names=None):
    """Unit cells of the converged A- and B-site columns and their statistics."""
    from ..lattice.cells import unit_cells
    from ..lattice.stats import cell_statistics

    ok = to_host(fit.status) == 0
    species = np.asarray(species)
    labels = sorted(set(species[ok]) - {"O", "-"})
    if names is not None and len(names) > 2:  # a third named class (e.g. "O") is not a cell
        labels = [x for x in labels if x in {str(n) for n in names[:2]}]
    use = ok & np.isin(species, labels)
    pos = to_host(fit.positions)[use]
    kw = dict(options)
    primitive = isinstance(kw.get("lattice"), str) and kw["lattice"] in ("hexagonal", "generic")
    if names is not None and len(names) >= 2:
        kw.setdefault("a_site", str(names[0]))
        if not primitive:  # the primitive-cell paths have no B-site columns
            kw.setdefault("b_site", str(names[1]))
    # Corner intensities let the checkerboard gate see an A/B split that merged two species.
    amp = to_host(fit.param("amplitude"))[use]
    try:
        cells = unit_cells(pos, species=species[use], intensities=amp, pixel_size=px, **kw)
    except ValueError as exc:
        text = str(exc)
        # A refusal of the lattice gates may come from the wrong contrast: say which was used.
        hint = "" if "contrast" in text or not isinstance(exc, AnalysisError) \
            else _contrast_hint(fit)
        raise AnalysisError(f"cells: {text}{hint}") from None
    if cells.n_cells < 2:
        raise AnalysisError(f"cells: found {cells.n_cells} unit cell(s) among {len(pos)} fitted "
                            "columns; need at least 2 for statistics")
    return cells, cell_statistics(cells, pixel_size=px)


# ---------------------------------------------------------------------------- tracking


class RegisteredFrames:
    """A lazy stack of rigidly registered frames: read from the source and shifted on access.

    What demons registers and ``track`` fits when the input was streamed (nothing but the
    mean was kept): frames are read from the lazy source and shifted by their rigid shifts.
    ``frames`` lists the source frames used (the unflagged ones). With ``batch`` (the rigid
    batch size) frames are shifted in the batches of rigid registration's own last pass,
    flagged frames included (the padding of a Fourier shift follows the largest shift of a
    batch), so they are the bits of ``rigid.registered`` of an in-memory run; the last
    shifted batch is cached, so reading batch after batch shifts each frame once.
    """

    def __init__(self, source, shifts, order, frames, backend, batch=None):
        self.source, self.order, self.backend = source, order, backend
        self.frames = np.asarray(frames, dtype=np.int64)
        self.all_shifts = np.asarray(shifts, dtype=float)
        self.shifts = self.all_shifts[self.frames]
        self.batch = None if batch is None else max(1, int(batch))
        self.shape = (len(self.frames), *tuple(int(x) for x in source.shape[1:]))
        self.dtype = np.dtype(np.float32)
        self._cache = None  # (rigid batch index, its shifted frames)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        # the backend by name (a Backend holds modules): a dask task rebuilds it
        state = dict(self.__dict__)
        state["backend"] = self.backend.name
        state["_cache"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.backend = resolve_backend(state["backend"])

    def __getitem__(self, key):
        from ..registration.rigid import apply_shifts

        if not isinstance(key, slice):
            raise TypeError("RegisteredFrames supports frame slices only")
        sel = range(*key.indices(self.shape[0]))
        idx = self.frames[list(sel)]
        if self.batch is not None:
            return self._on_rigid_grid(idx)
        raw = np.asarray(self.source[int(idx[0]):int(idx[-1]) + 1], dtype=np.float32) \
            if len(idx) else np.empty((0, *self.shape[1:]), np.float32)
        raw = raw[idx - idx[0]] if len(idx) else raw
        moved = apply_shifts(raw, self.shifts[list(sel)], order=self.order,
                             backend=self.backend)
        return to_host(moved).astype(np.float32, copy=False)

    def _on_rigid_grid(self, idx):
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float32)
        which = idx // self.batch
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            out[rows] = self._shifted_batch(int(k))[idx[rows] - int(k) * self.batch]
        return out

    def _shifted_batch(self, k):
        """Rigid batch ``k`` of the source, every frame shifted (host float32)."""
        from ..registration.rigid import apply_shifts

        cached = self._cache  # one read: tasks on a worker's threads share this object
        if cached is not None and cached[0] == k:
            return cached[1]
        self._cache = None  # free the old batch first
        a, b = k * self.batch, min(int(self.source.shape[0]), (k + 1) * self.batch)
        raw = np.asarray(self.source[a:b], dtype=np.float32)
        moved = to_host(apply_shifts(raw, self.all_shifts[a:b], order=self.order,
                                     backend=self.backend)).astype(np.float32, copy=False)
        self._cache = (k, moved)
        return moved


def track_stage(prep: Prepared, rigid, demons, fit, species, options: Mapping[str, Any],
                cells_options: Mapping[str, Any], names, progress, client=None):
    """Every column of the mean's fit in every usable registered frame, and the frame series.

    ``options["frames"]``: ``"rigid"`` (default) tracks the rigidly registered frames, whose
    scatter is an independent check of the error bars (scan noise the registration left
    shows as a ratio above 1); ``"demons"`` the demons-registered ones, whose warps follow
    part of each frame's noise (the ratio is then no independent check). Returns
    ``(tracks, series)``; ``series`` is None when no frame has enough unit cells (the reason
    is then in ``tracks.parameters["frame_series"]``).
    """
    from ..atoms.models import with_contrast
    from ..atoms.track import track_columns
    from ..lattice.series import frame_series

    series_keys = ("min_cells", "alpha", "frames")
    track_kw = {k: v for k, v in options.items() if k not in series_keys}
    # The frames are fitted with the contrast of the mean's fit (dips for ABF / BF).
    track_kw["model"] = with_contrast(track_kw.get("model", "gaussian"),
                                      fit.parameters.get("contrast", "bright")).name
    which = options.get("frames", "rigid")
    if which not in ("rigid", "demons"):
        raise ValueError(f"track frames must be one of 'rigid', 'demons'; got {which!r}")
    flagged = to_host(rigid.flagged).astype(bool)
    keep = np.flatnonzero(~flagged)
    if which == "demons":
        if demons is None:
            raise ValueError("track frames='demons' needs the 'demons' step")
        frames = demons.registered  # demons registered the unflagged frames only
    elif prep.streamed:
        frames = RegisteredFrames(prep.data, rigid.shifts, rigid.parameters.get(
            "order", "fourier"), keep, prep.backend, batch=rigid.parameters.get("batch_size"))
    else:
        frames = rigid.registered if not flagged.any() \
            else rigid.registered[prep.backend.asarray(keep)]
    if len(keep) < 3:
        raise AnalysisError(f"track: {len(keep)} usable registered frame(s); need at least 3")
    ok = to_host(fit.status) == 0
    labels = np.asarray(species).astype(str)[ok]
    if client is not None:  # frame batches as dask tasks
        from functools import partial

        from .distributed import track_columns_on

        track_columns = partial(track_columns_on, client)
    try:
        tracks = track_columns(frames, fit, species=labels, progress=progress,
                               backend=prep.backend, **track_kw)
    except ValueError as exc:
        raise AnalysisError(f"track: {exc}") from None
    tracks.parameters["frames"] = keep.tolist()
    tracks.parameters["registration"] = which
    corner = [str(n) for n in names[:2]] if names is not None and len(names) >= 2 else None
    try:
        series = frame_series(tracks, pixel_size=prep.pixel_size_pm, species=corner,
                              cell_options={k: v for k, v in cells_options.items()
                                            if k in _A_CELL_OPTIONS},
                              **{k: options[k] for k in ("min_cells", "alpha")
                                 if k in options})
    except ValueError as exc:
        tracks.parameters["frame_series"] = f"not measured: {exc}"
        series = None
    return tracks, series
