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
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .._progress import progress_bar

__all__ = ["ParallelStageError", "cluster_client", "describe_client", "map_bounded"]

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


def describe_client(client) -> dict:
    """Scheduler address, dashboard link and worker count of a client (for records)."""
    info = client.scheduler_info()
    return {"scheduler": info.get("address"), "workers": len(info.get("workers", {})),
            "dashboard": client.dashboard_link}


def _n_workers(client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def map_bounded(client, func: Callable, items: Sequence, *, label: Callable[[Any], str],
                stage: str, args: Iterable = (), progress: bool = False,
                desc: str | None = None, inflight: int = INFLIGHT,
                on_error: Callable[[Any, BaseException], Any] | None = None) -> list:
    """``[func(item, *args) for item in items]`` on the cluster, in item order.

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
    # scatter shared inputs once, to every worker, so no single copy can be lost
    shared = [client.scatter(a, broadcast=True) if _is_large(a) else a for a in args]
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

    bar = progress_bar(progress, total=len(items), desc=desc or stage, unit="task")
    try:
        for _ in range(limit):
            if not submit_next():
                break
        for fut in ac:
            i = futures.pop(fut.key)
            try:
                results[i] = fut.result()
            except Exception as exc:
                if on_error is None:
                    for other in list(ac.futures):
                        other.cancel()
                    raise ParallelStageError(
                        f"{stage}: the task for {label(items[i])} failed "
                        f"({type(exc).__name__}: {exc})") from exc
                results[i] = on_error(items[i], exc)
            fut.release()
            bar.update(1)
            submit_next()
    finally:
        bar.close()
    return results


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
        return func(*args)


def _is_large(obj) -> bool:
    """Arrays worth one broadcast scatter instead of a copy inside every task."""
    nbytes = getattr(obj, "nbytes", 0)
    return isinstance(nbytes, int) and nbytes > (1 << 20) and not hasattr(obj, "frame_range")
