"""Opt-in distribution on dask.distributed: every dask import of stemgpu lives here.

``client=None`` (the default everywhere) never reaches this module, so the in-process code
imports no dask. A ``client`` is one of:

- ``"local"``: a :class:`distributed.LocalCluster` of single-threaded CPU worker processes
  (one per core unless ``workers=`` says otherwise), started here and closed afterwards;
- ``"local-cuda"``: dask-cuda's ``LocalCUDACluster``, one single-threaded worker per GPU;
- a :class:`distributed.Client` of the caller's (used, never closed);
- a scheduler address (``"tcp://host:8786"``) or a scheduler file (``*.json``, as written by
  ``dask scheduler --scheduler-file``).

Work goes to the workers as whole tasks (a file, a frame batch): each task reads its own
frames from a picklable source (:class:`~stemgpu.io.lazy.LazyStack` pickles to a file
reference), so frame data never passes through the scheduler. At most ``inflight`` tasks
per worker are queued at a time (:func:`map_bounded`), which bounds worker memory by a few
batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .._progress import progress_bar

__all__ = ["ParallelStageError", "cluster_client", "demons_batches_on", "describe_client",
           "hold", "is_client", "map_bounded", "picklable_source", "register_rigid_on",
           "track_columns_on"]

#: Tasks queued per worker: one running, one whose inputs are being read.
INFLIGHT = 2


class ParallelStageError(RuntimeError):
    """A distributed task failed for good (e.g. it killed its worker every time).

    The message names the stage and the work item (file, frame range).
    """


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - sidpy depends on it
        raise ImportError("client= needs dask.distributed: pip install 'distributed'") from exc
    return distributed


def _local_cuda_cluster(workers, say):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ImportError("client='local-cuda' needs dask-cuda (pip install dask-cuda, "
                          "Linux with NVIDIA GPUs); use client='local' for CPU workers")\
            from exc
    kwargs = {"n_workers": workers} if workers else {}
    return LocalCUDACluster(threads_per_worker=1, dashboard_address=":0", **kwargs)


@contextlib.contextmanager
def cluster_client(spec, *, workers: int | None = None,
                   say: Callable[[str], Any] = print) -> Iterator[Any]:
    """A ``distributed.Client`` for ``spec`` (see the module text); closes what it started.

    Parameters
    ----------
    spec : {"local", "local-cuda"}, str, or distributed.Client
    workers : int, optional
        Worker processes of a cluster started here (default: one per CPU core, or per GPU).
    say : callable
        Where the dashboard address of a started cluster is printed.

    Raises
    ------
    ImportError
        ``"local-cuda"`` without dask-cuda installed.
    ValueError
        ``workers`` not an integer >= 1, or ``spec`` of another type.
    OSError
        The scheduler at the address or in the file cannot be reached.

    Examples
    --------
    >>> from stemgpu.app.distributed import cluster_client
    >>> with cluster_client("local", workers=1, say=lambda s: None) as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    from .._checks import check_int

    if workers is not None:
        workers = check_int(workers, "workers", minimum=1)
    distributed = _import_distributed()
    if isinstance(spec, distributed.Client):
        yield spec
        return
    if not isinstance(spec, str | os.PathLike) or not str(spec):
        raise ValueError(f"client must be 'local', 'local-cuda', a scheduler address or "
                         f"file, or a distributed.Client; got {spec!r}")
    spec = os.fspath(spec)
    cluster = None
    if spec == "local":
        cluster = distributed.LocalCluster(
            n_workers=workers or (os.cpu_count() or 1), threads_per_worker=1, processes=True,
            dashboard_address=":0")
    elif spec == "local-cuda":
        cluster = _local_cuda_cluster(workers, say)
    try:
        if cluster is not None:
            client = distributed.Client(cluster)
            say(f"dask dashboard: {describe_client(client)['dashboard']}")
        elif spec.endswith(".json"):
            client = distributed.Client(scheduler_file=spec, timeout="20s")
        else:
            client = distributed.Client(spec, timeout="20s")
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def is_client(obj) -> bool:
    """Whether ``obj`` is a connected ``distributed.Client`` (imports distributed)."""
    return isinstance(obj, _import_distributed().Client)


def describe_client(client) -> dict:
    """Scheduler address, dashboard link and worker count of a client (for records)."""
    info = client.scheduler_info()
    return {"scheduler": info.get("address"), "workers": len(info.get("workers", {})),
            "dashboard": client.dashboard_link}


def _n_workers(client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def map_bounded(client, func: Callable, items: Sequence, *, label: Callable[[Any], str],
                stage: str, args: Iterable = (), progress: bool = False,
                desc: str | None = None, inflight: int = INFLIGHT, leave: bool = True,
                on_error: Callable[[Any, BaseException], Any] | None = None,
                on_result: Callable[[int, Any], Any] | None = None) -> list:
    """``[func(item, *args) for item in items]`` on the cluster, in item order.

    With ``on_result``, each result is handed to ``on_result(index, result)`` as it arrives
    (in completion order) and not kept: the list returned then holds None, so the client
    holds at most the results in flight (a streamed stage writes each to its store).

    At most ``inflight`` tasks per worker are queued; the rest are submitted as earlier ones
    finish. A progress bar ticks per finished task. A task that fails for good (an exception
    in ``func``, or ``KilledWorker`` after dask's retries) raises
    :class:`ParallelStageError` naming ``stage`` and ``label(item)``, unless ``on_error`` is
    given: its return value (from ``(item, exception)``) then stands in for the result.

    Examples
    --------
    >>> from stemgpu.app.distributed import cluster_client, map_bounded
    >>> with cluster_client("local", workers=1, say=lambda s: None) as client:
    ...     map_bounded(client, pow, [1, 2, 3], args=(2,), label=str, stage="squares")
    [1, 4, 9]
    """
    distributed = _import_distributed()
    args = tuple(args)
    # large shared inputs go once to the cluster, as recomputable results (see hold)
    shared = [hold(client, a) if _is_large(a) else a for a in args]
    limit = max(1, inflight) * _n_workers(client)
    results: list = [None] * len(items)
    pending = iter(range(len(items)))
    futures = {}
    ac = distributed.as_completed()

    def submit_next() -> bool:
        i = next(pending, None)
        if i is None:
            return False
        fut = client.submit(_run_here, func, items[i], *shared, pure=False,
                            key=f"stemgpu-{stage}-{i}-{os.urandom(4).hex()}")
        futures[fut.key] = i
        ac.add(fut)
        return True

    bar = progress_bar(progress, total=len(items), desc=desc or stage, unit="batch",
                       leave=leave)
    try:
        for _ in range(limit):
            if not submit_next():
                break
        for fut in ac:
            i = futures.pop(fut.key)
            try:
                result = _aligned(fut.result())
            except Exception as exc:
                if on_error is None:
                    for other in list(ac.futures):
                        other.cancel()
                    raise ParallelStageError(
                        f"{stage}: the task for {label(items[i])} failed "
                        f"({type(exc).__name__}: {exc})") from exc
                result = on_error(items[i], exc)
            fut.release()
            if on_result is None:
                results[i] = result
            else:
                try:
                    on_result(i, result)
                except BaseException:  # e.g. the store's disk is full: stop the rest too
                    for other in list(ac.futures):
                        other.cancel()
                    raise
            del result
            bar.update(1)
            submit_next()
    finally:
        bar.close()
    return results


def picklable_source(source):
    """A lazy frame source that pickles to a file reference (tasks then read the file).

    A :class:`~stemgpu.io.lazy.LazyStack` already does; an ``h5py.Dataset`` or a whole
    ``numpy.memmap`` becomes one; anything else is returned as it is (and must pickle).

    Examples
    --------
    >>> import os, pickle, tempfile, numpy as np
    >>> from stemgpu.app.distributed import picklable_source
    >>> path = os.path.join(tempfile.mkdtemp(), "raw.bin")
    >>> np.arange(24, dtype="f4").tofile(path)
    >>> src = picklable_source(np.memmap(path, dtype="f4", mode="r", shape=(2, 3, 4)))
    >>> len(pickle.dumps(src)) < 2048, float(pickle.loads(pickle.dumps(src))[1, 2, 3])
    (True, 23.0)
    """
    import numpy as np

    from ..io.lazy import LazyStack

    if isinstance(source, LazyStack):
        return source
    if type(source).__module__.startswith("h5py"):
        return LazyStack.from_hdf5(source.file.filename, source.name)
    if isinstance(source, np.memmap):
        return LazyStack.from_array(source.filename, source, kind="memmap")
    return source


def _identity(obj):
    return obj


def hold(client, obj):
    """A future of ``obj`` that the tasks share: sent once, and not lost with a worker.

    It is the result of a task whose argument is ``obj``, so the scheduler, which keeps the
    task, recomputes it when the workers holding it die; a ``Client.scatter`` copy lost with
    its workers would fail every task that needs it ("lost dependencies").
    """
    return client.submit(_identity, obj, pure=False,
                         key=f"stemgpu-shared-{os.urandom(8).hex()}")


def _run_here(func, *args):
    """Run ``func`` in the worker with dask's synchronous scheduler.

    Inside a task, dask would send any collection computed by the code (sidpy's dask arrays
    while saving, say) back to the cluster, pickling open h5py files; stemgpu's tasks are
    the unit of work, so what they compute stays in the worker's own thread.
    """
    import dask
    from distributed import get_client, get_worker

    try:
        get_worker()
    except ValueError:  # not in a worker
        pass
    else:
        # dask makes the worker's client on first need (dask.array.store asks for one to
        # pick a lock), and making it sets the global scheduler to the cluster: make it now,
        # so the setting below wins
        get_client()
    with dask.config.set(scheduler="sync"):
        return func(*(_aligned(a) for a in args))


def _aligned(obj):
    """``obj`` with every NumPy array in it (also in tuples and lists) in its own memory.

    Arrays unpickled from dask's message frames can sit at odd addresses; NumPy then takes
    buffered loops whose reductions sum in another order than on aligned memory, which
    changes the last bits of results. A copy is aligned, as in-process arrays are.
    """
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj if obj.flags.aligned and obj.flags.writeable else obj.copy()
    if isinstance(obj, tuple | list):
        return type(obj)(_aligned(x) for x in obj)
    return obj


def _is_large(obj) -> bool:
    """Arrays worth sending once (:func:`hold`) instead of a copy inside every task."""
    nbytes = getattr(obj, "nbytes", 0)
    return isinstance(nbytes, int) and nbytes > (1 << 20) and not hasattr(obj, "frame_range")


# --------------------------------------------------------------------------- rigid registration
#
# The passes of stemgpu.registration.passes, with each batch a task. A task gets the
# shared context (the plan without its backend, and the picklable source or nothing), its
# frame range and what earlier passes produced (host shifts, the summed spectra), and
# returns host arrays; the client merges them in batch order, exactly as the in-process
# loops do, so the NumPy results are bit-identical.

_RIGID_OPTIONS = {"reference", "upsample", "window", "normalization", "max_shift", "mode",
                  "iterations", "polish", "batch_size", "order", "keep_registered", "out",
                  "band"}


class _RigidContext:
    """What every rigid task needs: a plan to rebuild on the worker, and the frames."""

    def __init__(self, plan, source, dtype):
        be = plan.be
        self.backend = be.name
        self.plan = dataclasses.replace(
            plan, be=None, progress=False,
            window=None if plan.window is None else be.to_numpy(plan.window),
            col_weights=be.to_numpy(plan.col_weights))
        self.source = source  # a picklable lazy source, or None (frames travel with tasks)
        self.dtype = dtype

    def worker_plan(self):
        from ..backend import resolve_backend

        be = resolve_backend(self.backend)
        p = self.plan
        return dataclasses.replace(
            p, be=be, window=None if p.window is None else be.asarray(_aligned(p.window)),
            col_weights=be.asarray(_aligned(p.col_weights)))

    def frames(self, plan, start, stop, data):
        """Frames ``start:stop`` on the worker's backend, read as ``rigid.FrameSource`` does."""
        from types import SimpleNamespace

        from ..registration.rigid import FrameSource

        if self.source is None:
            return plan.be.asarray(data)
        reader = SimpleNamespace(lazy=True, data=self.source, dtype=self.dtype, be=plan.be)
        return FrameSource.read(reader, start, stop)


def _rigid_spectra(ctx, item):
    from ..registration import passes

    plan = ctx.worker_plan()
    start, stop, data = item[:3]
    return plan, passes.Spectra(plan, cache=False), ctx.frames(plan, start, stop, data)


def _task_steps(item, ctx):
    """Frame-to-previous steps of frames ``start:stop`` (reads frame ``start - 1`` too)."""
    from ..registration import passes

    plan, spectra, frames = _rigid_spectra(ctx, item)
    first = item[3]  # frames[0] is frame start - 1 unless this is the first batch
    spec, _ = spectra.get(None, frames)
    prev, spec = (None, spec) if first else (spec[:1], spec[1:])
    return passes.frame_steps(plan, prev, spec)


def _task_shifted_sum(item, ctx):
    plan, spectra, frames = _rigid_spectra(ctx, item)
    spec, _ = spectra.get(None, frames)
    return plan.be.to_numpy(spectra.shifted_sum(spec, item[3]))


def _task_leave_one_out(item, ctx, total):
    from ..registration import passes

    plan, spectra, frames = _rigid_spectra(ctx, item)
    spec, _ = spectra.get(None, frames)
    shifts = item[3]
    loo = passes.leave_one_out(plan, plan.be.asarray(total), spec, shifts)
    new, quality, at_limit = passes.near_peaks(plan, loo, spec, shifts, plan.limit)
    return new, quality, at_limit, plan.be.to_numpy(spectra.shifted_sum(spec, new))


def _task_to_frame(item, ctx, ref_frame):
    from ..registration import passes


    plan, spectra, frames = _rigid_spectra(ctx, item)
    spec, _ = spectra.get(None, frames)
    ref_spec = passes.prepare_spectra(plan.be, plan.be.asarray(ref_frame), plan.window)[0]
    return passes.near_peaks(plan, ref_spec, spec, item[3], plan.limit)


def _task_write(item, ctx, order, keep):
    from ..registration import passes

    plan, _, frames = _rigid_spectra(ctx, item)
    be, xp = plan.be, plan.be.xp
    moved = passes.shift_batch(be, frames, item[3], order)
    part = be.to_numpy(moved.sum(axis=0, dtype=xp.float64))
    return part, (be.to_numpy(moved) if keep else None)


def _check_rigid_options(options) -> dict:
    unknown = set(options) - _RIGID_OPTIONS
    if unknown:
        raise TypeError(f"register_rigid got unexpected option(s) {sorted(unknown)}")
    if options.get("mode", "reference") != "reference" or options.get("polish", False):
        raise ValueError("client=: rigid registration on a cluster supports mode='reference' "
                         "without polish; got mode="
                         f"{options.get('mode', 'reference')!r}, polish="
                         f"{options.get('polish', False)!r} (use client=None)")
    if options.get("out") is not None:
        raise ValueError("client=: out= is not supported on a cluster (use client=None)")
    return dict(options)


def register_rigid_on(client, stack, *, pixel_size=None, backend=None, progress=False,
                      **options):
    """:func:`stemgpu.register_rigid` with every frame batch a task on ``client``.

    Supports ``mode="reference"`` (``reference="mean"`` with ``iterations``, or a frame
    index) without ``polish`` and without ``out=``; the other options are those of
    ``register_rigid``. A lazy source (:class:`~stemgpu.io.lazy.LazyStack`) goes to the
    workers as a file reference and each task reads its own frames (plus the frame before,
    for the frame-to-previous pass); an in-memory stack is sent batch by batch. The passes
    are those of the in-process code and the client sums the per-batch results in batch
    order, so on NumPy the shifts, quality and mean are bit-identical to
    ``register_rigid(stack, ...)`` with the same ``batch_size``. The first pass reads the
    frames twice (steps, then the sums at the chained shifts): one pass more than in process.

    Raises
    ------
    ValueError, TypeError
        As ``register_rigid``; also for ``mode="pairs"``, ``polish=True`` or ``out=``.
    ParallelStageError
        A batch failed for good; the message names the pass and the frame range.

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_stack
    >>> from stemgpu.registration.rigid import register_rigid
    >>> from stemgpu.app.distributed import cluster_client, register_rigid_on
    >>> stack, _ = simulate_stack((6, 64, 64), frame_jitter_px=1.0, seed=2)
    >>> with cluster_client("local", workers=1, say=lambda s: None) as client:
    ...     res = register_rigid_on(client, stack, batch_size=4, backend="numpy")
    >>> ref = register_rigid(stack, batch_size=4, backend="numpy")
    >>> bool((res.shifts == ref.shifts).all() and (res.mean == ref.mean).all())
    True
    """
    import numpy as np

    from .._checks import check_choice, check_int, check_pair, fail
    from ..registration import passes
    from ..registration import rigid as rg

    options = _check_rigid_options(options)
    reference = options.get("reference", "mean")
    upsample = options.get("upsample", 100)
    window = options.get("window", "hann")
    normalization = options.get("normalization")
    max_shift = options.get("max_shift")
    iterations = options.get("iterations", 1)
    order = options.get("order", "fourier")
    band = options.get("band")

    src = rg.FrameSource(stack, backend, pixel_size)
    be = src.be
    n, h, w = src.shape
    # the checks and the plan of register_rigid, in its order
    ref_index = rg.check_reference(reference, n)
    upsample = check_int(upsample, "upsample", minimum=1, maximum=rg.MAX_UPSAMPLE)
    check_choice(window, "window", rg.WINDOWS)
    check_choice(normalization, "normalization", rg.NORMALIZATIONS)
    limit = None if max_shift is None else check_pair(max_shift, "max_shift", greater=0)
    band = None if band is None else check_int(band, "band", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=0, maximum=100)
    order = check_choice(order, "order", rg.ORDERS)
    keep_registered = options.get("keep_registered", True)
    if not isinstance(keep_registered, bool):
        fail("keep_registered", "True or False", keep_registered)
    plan = passes.Plan(
        be=be, shape=(n, h, w), ref_index=ref_index, upsample=upsample,
        normalization=normalization, limit=limit, polish=False, progress=progress,
        batch_size=be.frames_per_batch(src.shape, rg.BYTES_PER_PIXEL,
                                       batch_size=options.get("batch_size", "auto"),
                                       gpu_fraction=0.25, cpu_fraction=0.125,
                                       cpu_cap=256 * 2**20, max_frames=64),
        window=passes.hann_window(be.xp, (h, w)) if window == "hann" else None,
        col_weights=passes.half_spectrum_weights(be.xp, w), scale=rg.fft_scale(src))
    bsize = plan.batch_size
    ranges = [(s, min(n, s + bsize)) for s in range(0, n, bsize)]
    ctx = _RigidContext(plan, picklable_source(src.data) if src.lazy else None, src.dtype)
    ctx_f = hold(client, ctx)

    def data(start, stop):  # frames travel with the task only for in-memory stacks
        return None if src.lazy else be.to_numpy(src.data[start:stop])

    def run(func, items, desc, *args):
        return map_bounded(client, func, items, args=(ctx_f, *args), stage=f"rigid {desc}",
                           label=lambda it: f"frames {it[0]}:{it[1]}", progress=progress,
                           desc=desc, leave=False)

    # pass 1: frame-to-previous steps, chained on the client, then the sums at those shifts
    items = [(max(0, s - 1), e, data(max(0, s - 1), e), s == 0) for s, e in ranges]
    steps = run(_task_steps, items, "frame-to-frame")
    shifts = np.zeros((n, 2))
    quality = np.zeros(n, dtype=np.float32)
    running = np.zeros(2)
    for (s, e), (step, q) in zip(ranges, steps, strict=True):
        shifts[s:e] = running + np.cumsum(step, axis=0)
        quality[s:e] = q
        running = shifts[e - 1].copy()
    quality[0] = quality[1]
    parts = run(_task_shifted_sum, [(s, e, data(s, e), shifts[s:e]) for s, e in ranges],
                "frame-to-frame")
    total = _ordered_sum(be, parts)
    shifts, total = passes.recentre(plan, shifts, total)
    at_limit = np.zeros(n, dtype=bool)
    if ref_index is not None:
        ref_frame = be.to_numpy(src.read(ref_index, ref_index + 1))
        ref_f = hold(client, ref_frame)
        out = run(_task_to_frame, [(s, e, data(s, e), shifts[s:e]) for s, e in ranges],
                  "register", ref_f)
        shifts = np.concatenate([o[0] for o in out])
        quality = np.concatenate([o[1] for o in out])
        at_limit = np.concatenate([o[2] for o in out])
    else:
        for _ in range(iterations):
            total_f = hold(client, be.to_numpy(total))
            out = run(_task_leave_one_out,
                      [(s, e, data(s, e), shifts[s:e]) for s, e in ranges], "register",
                      total_f)
            new = np.concatenate([o[0] for o in out])
            quality = np.concatenate([o[1] for o in out])
            at_limit = np.concatenate([o[2] for o in out])
            shifts, total = passes.recentre(plan, new, _ordered_sum(be, [o[3] for o in out]))
    # The quality gates of register_rigid, on the client (host arrays of n numbers); the
    # chain repair and the second round without unrelated frames run in process only.
    from ..registration import gates

    host_window = None if plan.window is None else be.to_numpy(plan.window)
    shifts, reasons, corrected = gates.judge(
        shifts, quality, n_eff=gates.effective_pixels(host_window, (h, w)), limit=limit,
        at_limit=at_limit, inlier_fraction=None, tied=np.ones(n, dtype=bool),
        window=host_window, frame=lambda k: be.to_numpy(src.read(k, k + 1)[0]))
    keep = keep_registered and not src.lazy
    out = run(_task_write, [(s, e, data(s, e), shifts[s:e]) for s, e in ranges], "shift",
              order, keep)
    mean_acc = be.xp.zeros((h, w), dtype=be.xp.float64)
    for part, _ in out:
        mean_acc += be.asarray(part)
    mean_img = (mean_acc / n).astype(src.dtype)
    registered = None
    if keep:
        registered = be.asarray(np.concatenate([o[1] for o in out]))
    flagged = np.array([bool(r) for r in reasons])
    params = {
        "reference": reference, "upsample": upsample, "window": window,
        "normalization": normalization, "max_shift": limit, "mode": "reference", "band": band,
        "iterations": iterations if ref_index is None else 0,
        "polish": False, "batch_size": bsize, "order": order, "backend": be.name,
        "streamed": src.lazy, "shape": (n, h, w), "cell_jumps_corrected": corrected,
    }
    return rg.RigidResult(
        shifts=shifts, quality=quality, registered=registered, mean=mean_img,
        valid_region=rg.valid_region(shifts, (n, h, w), order), flagged=flagged,
        pixel_size_pm=src.pixel_size_pm, parameters=params, flag_reasons=reasons)


def _ordered_sum(be, parts):
    """``((p0 + p1) + p2) + ...`` on the client's backend: the in-process loops' order."""
    total = None
    for part in parts:
        part = be.asarray(part)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------- column tracking


def _task_fit_frames(item, stack, start, gain, fit_kw):
    """``fit_atoms`` of frames ``a:b`` (read here from ``stack``, or given in ``item``)."""
    import numpy as np

    from ..atoms.fit import fit_atoms
    from ..atoms.track import FRAME_FIT_FIELDS

    a, b, data = item
    if data is None:
        frames = np.asarray(stack[a:b], dtype=np.float32)
    else:
        frames = data
    fit = fit_atoms(frames, np.broadcast_to(start, (b - a, len(start), 2)),
                    counts_per_unit=gain, **fit_kw).to_numpy()
    # pickling makes every array C-ordered; the client restores each field's memory
    # layout, on which the order of later reductions (and so their last bits) depends
    return fit, {f: _axis_order(getattr(fit, f)) for f in FRAME_FIT_FIELDS}


def _axis_order(a) -> tuple:
    """Axes of ``a`` from the largest stride to the smallest."""
    import numpy as np

    return tuple(int(i) for i in np.argsort([-s for s in a.strides], kind="stable"))


def _with_axis_order(a, order):
    """A copy of ``a`` whose memory layout has axes in ``order`` (as :func:`_axis_order`)."""
    import numpy as np

    return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))


def _restore_fit(result):
    fit, orders = result
    return dataclasses.replace(fit, **{f: _with_axis_order(getattr(fit, f), o)
                                       for f, o in orders.items()})


def _fit_frames_on(client, stack, start, batch_frames, counts_per_unit, progress, fit_kw):
    """``atoms.track._fit_frames`` with each frame batch a task (same batches, same merge)."""
    import numpy as np

    from .._inputs import is_frame_source
    from ..atoms.track import FRAME_FIT_FIELDS
    from ..backend import resolve_backend

    be = resolve_backend(fit_kw["backend"])
    fit_kw = {**fit_kw, "backend": be.name}
    f_n, n = int(stack.shape[0]), len(start)
    lazy = is_frame_source(stack)
    if batch_frames == "auto" and not lazy:
        batch = f_n
    else:
        batch = be.frames_per_batch(tuple(stack.shape), 256, batch_size=batch_frames)
    ranges = [(a, min(f_n, a + batch)) for a in range(0, f_n, batch)]
    items = [(a, b, None if lazy else be.to_numpy(stack[a:b])) for a, b in ranges]
    stack_f = hold(client, picklable_source(stack)) if lazy else None
    start_f = hold(client, start)

    def run(part, gain):
        out = map_bounded(client, _task_fit_frames, part, args=(stack_f, start_f, gain, fit_kw),
                          stage=f"track {n} columns", desc=f"track {n} columns",
                          label=lambda it: f"frames {it[0]}:{it[1]}", progress=progress,
                          leave=False)
        return [_restore_fit(r) for r in out]

    first = run(items[:1], counts_per_unit)[0]
    if len(items) == 1:
        return first
    gain = first.counts_per_unit if counts_per_unit is None else counts_per_unit
    parts = [first, *run(items[1:], gain)]
    merged = {f: np.concatenate([getattr(p, f) for p in parts]) for f in FRAME_FIT_FIELDS}
    params = {**parts[0].parameters, "batch_frames": int(batch),
              "counts_per_unit_from_first_batch": counts_per_unit is None}
    return dataclasses.replace(parts[0], parameters=params, **merged)


def track_columns_on(client, stack, positions, *, species=None, sigma=None, window=None,
                     estimator="mle", counts_per_unit=None, model="gaussian", jump_z=6.0,
                     fade_z=5.0, fade_fraction=0.2, erratic_p=1e-6, frame_z=6.0,
                     fail_fraction=0.2, level=0.6827, batch_frames="auto", engine="auto",
                     progress=False, backend=None):
    """:func:`stemgpu.track_columns` with each frame batch of fits a task on ``client``.

    The batches are those of ``track_columns`` (``batch_frames``; ``"auto"`` fits an
    in-memory stack in one batch, so give an integer to spread it over the workers): the
    first batch estimates the gain when ``counts_per_unit`` is omitted, the others run in
    parallel with it, and the merge is the same, so on NumPy the tracks are bit-identical
    to ``track_columns``. A lazy stack (a :class:`~stemgpu.io.lazy.LazyStack`, or the
    registered frames of a streamed analysis) is read by the tasks themselves.

    Examples
    --------
    >>> import numpy as np, stemgpu
    >>> from stemgpu.app.distributed import cluster_client, track_columns_on
    >>> stack, truth = stemgpu.simulate_stack((6, 96, 96), seed=3)
    >>> pos = truth.image_positions(0)[truth.visible(0, margin=10)]
    >>> with cluster_client("local", workers=1, say=lambda s: None) as client:
    ...     tracks = track_columns_on(client, stack, pos, batch_frames=3, backend="numpy")
    >>> ref = stemgpu.track_columns(stack, pos, batch_frames=3, backend="numpy")
    >>> bool(np.array_equal(tracks.positions, ref.positions, equal_nan=True))
    True
    """

    from .._checks import check_batch_size
    from ..atoms import track as tr

    check_batch_size(batch_frames, "batch_frames")
    start, species, fit_kw, gates = tr.prepare_tracking(
        stack, positions, species=species, sigma=sigma, window=window, estimator=estimator,
        model=model, engine=engine, backend=backend, jump_z=jump_z, fade_z=fade_z,
        fade_fraction=fade_fraction, erratic_p=erratic_p, frame_z=frame_z,
        fail_fraction=fail_fraction, level=level)
    fit = _fit_frames_on(client, stack, start, batch_frames, counts_per_unit, progress, fit_kw)
    return tr.assess_tracks(fit, species, gates)


# --------------------------------------------------------------------------- streamed demons


def _task_demons(item, work, frames, reference, options, backend):
    """One streamed demons batch on a worker: ``work`` reads frames ``a:b`` itself."""
    a, b = item
    return work(frames, a, b, reference, options, backend)


def demons_batches_on(client, run, frames, ranges, reference, options, backend, progress,
                      desc, work):
    """The batches of one streamed demons pass as tasks on ``client``.

    ``frames`` (the stage's :class:`~stemgpu.app.stages.RegisteredFrames`, or any lazy
    frame source) goes to the workers as a file reference and every task reads and shifts
    its own frames with ``work(frames, start, stop, reference, options, backend)`` (the
    stage's batch function, passed in: this module imports no stage); the reference is sent
    once. Each finished batch is handed to
    ``run.add(start, result)`` here on the client, which writes the frame store, as it
    arrives; at most ``INFLIGHT`` batches per worker are queued, so the client holds a few
    batches at most. Frames are independent given the reference, so on NumPy the results
    are bit-identical to the in-process pass (the stage adds the batches to its sums in
    frame order, whatever order they finish in).

    Raises
    ------
    ParallelStageError
        A batch failed for good; the message names the frame range.
    """
    import copy

    import numpy as np

    if hasattr(frames, "source"):  # RegisteredFrames: its source must pickle to a reference
        frames = copy.copy(frames)
        frames.source = picklable_source(frames.source)
    frames_f = hold(client, picklable_source(frames))
    ref_f = hold(client, np.asarray(reference))
    map_bounded(client, _task_demons, list(ranges),
                args=(work, frames_f, ref_f, options, backend),
                stage="demons", label=lambda it: f"frames {it[0]}:{it[1]}",
                progress=progress, desc=desc, leave=False,
                on_result=lambda i, res: run.add(ranges[i][0], res))
