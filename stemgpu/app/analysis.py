"""The end-to-end analysis: rigid -> demons -> atoms -> cells, in one call.

:func:`analyze` runs the stages a user asks for on one stack and returns an
:class:`Analysis` holding every stage's result. ``Analysis.summary()`` gives the summary
table (jitter, drift, cell sides, angles, area, B-site displacement, tetragonal and shear
distortion), every figure with its one-sigma uncertainty; ``Analysis.plot_report()`` draws
the report figure; ``stemgpu.save(analysis, path)`` writes everything to one HDF5 file.

Stages (each a function of :mod:`stemgpu.app.stages`)
-----------------------------------------------------
``"rigid"``
    :func:`stemgpu.register_rigid` (reference: the stack mean) and
    :func:`stemgpu.drift_report` (linear drift plus frame jitter, in pm).
``"demons"``
    :func:`stemgpu.register_demons` of the rigidly registered frames onto their mean.
``"atoms"``
    On the registered mean image: :func:`stemgpu.find_atoms`, a first
    :func:`stemgpu.fit_atoms`, species by fitted amplitude (A-site brightest), then, for a
    perovskite (``edge_columns=True``), the faint O columns are started at the A-A edge
    midpoints and every column is refitted together so that the O tails do not bias the
    B-site positions.
``"cells"``
    :func:`stemgpu.unit_cells` on the converged A- and B-site columns and
    :func:`stemgpu.cell_statistics` (medians with bootstrap uncertainties).
``"track"`` (asked for; not in the default steps)
    :func:`stemgpu.track_columns`: every converged column of the mean's fit in every usable
    rigidly registered frame (``track={"frames": "demons"}`` for the demons-registered ones,
    whose warps absorb part of the frame noise), the calibration ratio of the error bars
    per species, flagged columns and frames; :func:`stemgpu.frame_series`: the unit cells of
    every frame and the drift of the lattice over the series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .._progress import progress_bar
from . import stages
from .steps import STEPS, check_options, check_steps
from .summary import quality, summary_rows
from .table import format_quality, format_rows

__all__ = ["Analysis", "analyze"]


class Analysis:
    """Every stage's result of :func:`analyze`, with the summary table and the plots.

    Attributes
    ----------
    results : dict
        ``"info"`` (pixel size, steps, timings, backend, options) and, per stage run,
        ``"rigid"`` (:class:`~stemgpu.registration.rigid.RigidResult`), ``"drift"``
        (:class:`~stemgpu.registration.drift.DriftReport`), ``"demons"``
        (:class:`~stemgpu.registration.demons.DemonsResult`), ``"mean_image"`` (the
        registered mean), ``"atoms"`` (:class:`~stemgpu.atoms.fit.AtomFit`), ``"species"``
        (label per fitted column), ``"cells"``
        (:class:`~stemgpu.lattice.cells.UnitCells`), ``"statistics"``
        (:class:`~stemgpu.lattice.stats.CellStatistics`) and, with the ``"track"`` step,
        ``"tracks"`` (:class:`~stemgpu.atoms.track.ColumnTracks`) and ``"frame_series"``
        (:class:`~stemgpu.lattice.series.FrameSeries`, or None).

    The stage results are also attributes (``analysis.rigid``, ``analysis.cells``, ...;
    ``None`` for a stage not run). ``stemgpu.load`` rebuilds an Analysis from a saved file.
    """

    def __init__(self, results: Mapping[str, Any]):
        self.results = dict(results)
        self._stores: list = []

    def close(self) -> None:
        """Remove the temporary frame store of a streamed demons step (after saving).

        ``demons.registered`` / ``demons.displacement`` of a streamed analysis are then
        unreadable; everything else stays. Nothing to do for an in-memory analysis.
        """
        for store in self._stores:
            store.close()
        self._stores = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name: str):
        if name in ("rigid", "drift", "demons", "mean_image", "atoms", "species", "cells",
                    "statistics", "tracks", "frame_series", "info"):
            return self.__dict__["results"].get(name)
        raise AttributeError(f"'Analysis' object has no attribute {name!r}")

    @property
    def pixel_size_pm(self) -> float:
        """Pixel size (pm) every calibrated figure uses."""
        return float(self.results["info"]["pixel_size_pm"])

    def __repr__(self) -> str:
        done = [k for k in self.results if k != "info"]
        return f"Analysis(pixel_size_pm={self.pixel_size_pm:g}, results={done})"

    # ------------------------------------------------------------------ summary
    def summary(self, as_text: bool = False):
        """The summary table: every figure with its one-sigma uncertainty.

        Returns a dict ``name -> Row`` (or an aligned text table with ``as_text=True``).

        Uncertainties (one sigma; ``Row.uncertainty`` statistical, ``Row.systematic`` the
        known systematic floor of the fit, ``Row.total_uncertainty`` both): the jitter std
        of ``n`` frames about a fit with ``p`` parameters has
        ``s / sqrt(2 (n - p))`` (normal jitter); the drift rate has the standard error of
        the smooth fit (``s / sqrt(sum (t - mean t)^2)`` for a straight line, propagated
        through the hat matrix for a polynomial or spline); cell figures are medians with the
        bootstrap uncertainty of the median (:func:`stemgpu.cell_statistics`); ``std`` is
        the spread over frames or cells. The jitter rows' notes also give the 68 % interval
        of the jitter std (:func:`~stemgpu.app.statistics.std_interval`): for few frames the
        sampling distribution of a standard deviation is skewed and ``s / sqrt(2 (n - p))``
        understates how far above ``s`` the true value can lie; the drift rows' notes give
        the 68 % half-width of the rate's Student t distribution (its error scales with the
        residual std). Smallest and longest side are order statistics of four noisy sides:
        position noise biases them apart (see ``|a1|``, ``|a2|`` for unbiased side
        lengths). The rows are built in :mod:`stemgpu.app.summary`.

        The text ends with the quality section (:meth:`quality`) after the notes; an analysis
        saved before the section existed (no ``info["quality_section"]``) prints as it did.
        """
        rows = summary_rows(self)
        if not as_text:
            return rows
        text = format_rows(rows)
        if (self.info or {}).get("quality_section"):
            text += "\n" + format_quality(quality(self))
        return text

    def quality(self, as_text: bool = False):
        """How far the numbers can be trusted: flagged frames and columns and why, the
        fraction of candidate cells rejected, every gate's record and a warning line for each
        gate that came close to its limit.

        Returns the dict of :func:`stemgpu.app.summary.quality` (derived from the stored
        results only, so a saved and loaded analysis gives the same), or its text with
        ``as_text=True``.

        Examples
        --------
        >>> import stemgpu
        >>> image, _ = stemgpu.simulate_image((160, 160), seed=0)
        >>> res = stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"),
        ...                       progress=False)
        >>> res.quality()["cells"]["fraction_rejected"] < 0.5
        True
        >>> print(res.quality(as_text=True).splitlines()[0])
        quality:
        """
        q = quality(self)
        return format_quality(q) if as_text else q

    def __str__(self) -> str:
        return self.summary(as_text=True)

    # ------------------------------------------------------------------ plots
    def plot_drift(self, ax=None):
        """Drift trajectory with its smooth fit, and the jitter (see ``DriftReport.plot``)."""
        if self.drift is None:
            raise ValueError("plot_drift needs the 'rigid' step; it was not run")
        return self.drift.plot(ax=ax)

    def plot_columns(self, ax=None):
        """The registered mean with the refined columns overlaid by species."""
        from .report import plot_columns

        return plot_columns(self, ax=ax)

    def plot_maps(self):
        """Maps of tetragonal distortion, shear, rotation and B-site displacement."""
        from .report import plot_maps

        return plot_maps(self)

    def plot_histograms(self, bins: int = 40):
        """Histograms of sides, angles, areas, distortions and B-site distance."""
        from ..lattice.plot import plot_cell_histograms

        if self.cells is None:
            raise ValueError("plot_histograms needs the 'cells' step; it was not run")
        return plot_cell_histograms(self.cells, pixel_size=self.pixel_size_pm, bins=bins)

    def plot_tracks(self):
        """Scatter map, calibration ratios and lattice time series of the ``"track"`` step."""
        from .report import plot_tracks

        return plot_tracks(self)

    def plot_report(self, path=None):
        """One-page report figure (drift, columns, maps, histograms); saved when ``path``."""
        from .report import plot_report

        return plot_report(self, path=path)


def _silent(*args, **kwargs) -> None:
    pass


class _Clock:
    """Stage timings (into ``info["timings_s"]``) and the stage progress bar."""

    def __init__(self, info: dict, bar):
        self.info, self.bar = info, bar

    @contextmanager
    def stage(self, name: str, label: str) -> Iterator[None]:
        self.bar.set_postfix_str(label)
        t0 = time.perf_counter()
        yield
        self.info["timings_s"][name] = time.perf_counter() - t0
        self.bar.update(1)


def _check_scratch_dir(path):
    """``scratch_dir`` as a path of an existing folder (or None), checked before any stage."""
    if path is None:
        return None
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"scratch_dir must be a folder path (str or os.PathLike) or None; got "
                        f"{type(path).__name__}") from None
    if not os.path.isdir(path):
        raise ValueError(f"scratch_dir must be an existing folder; got {path!r}")
    return path


def analyze(stack, *, pixel_size: float | None = None,
            steps: Sequence[str] = STEPS, backend=None, progress: bool = True,
            lattice=None, client=None, scratch_dir=None, **stage_options) -> Analysis:
    """Register a stack, fit its atom columns and measure its unit cells, in one call.

    Parameters
    ----------
    stack : (n, h, w) or (h, w) array, sidpy.Dataset, or lazy frame source
        NumPy or CuPy data (a sidpy Dataset from :func:`stemgpu.open` carries its
        calibration and frame time). A single image allows only ``("atoms", "cells")``. A
        lazy source (:func:`stemgpu.open_frames`, an h5py dataset, a memmap) is streamed
        batch by batch, so a stack larger than memory can be analysed; it needs
        ``"rigid"``. Rigid registration keeps only the registered mean; ``"demons"``
        registers the rigidly registered frames batch by batch onto that mean and writes
        its registered frames (and fields) to a temporary chunked store in ``scratch_dir``
        (:class:`~stemgpu.io.store.FrameStore`); ``demons.registered`` and
        ``demons.displacement`` are then lazy frame sources on it (removed by
        :meth:`Analysis.close`, else when the analysis and every array taken from the
        store are garbage-collected, else at interpreter exit; a process killed outright
        leaves its ``.stemgpu-store-*`` folder behind).
    pixel_size : float, optional
        pm per pixel; overrides the data's calibration and is required without one.
    steps : sequence of {"rigid", "demons", "atoms", "cells", "track"}
        Stages to run (always in this order; default the first four). ``"demons"`` needs
        ``"rigid"``, ``"cells"`` needs ``"atoms"``, ``"track"`` needs ``"rigid"`` and
        ``"atoms"``.
    backend : {"numpy", "cupy", "auto"}, optional
        See :mod:`stemgpu.backend`; every stage runs on it.
    progress : bool
        tqdm progress bars per stage.
    lattice : {"perovskite", "hexagonal", "generic"}, float or (2, 2) array, optional
        The ``lattice=`` of :func:`stemgpu.unit_cells` (the same as ``cells={"lattice":
        ...}``). For ``"hexagonal"`` / ``"generic"`` no O columns are placed and the cells
        are the primitive cells of the brightest intensity class (``atoms={"n_classes": 1}``
        for a one-species lattice such as graphene).
    client : {None, "local", "local-cuda"}, str or distributed.Client
        None (default): everything in this process, no dask. Otherwise rigid registration
        and column tracking run frame batch by frame batch as dask.distributed tasks (see
        :mod:`stemgpu.app.distributed`): ``"local"`` starts a LocalCluster of CPU worker
        processes, ``"local-cuda"`` dask-cuda's LocalCUDACluster (one worker per GPU), a
        string is a scheduler address or file, or pass your own Client (never closed).
        On NumPy the results are bit-identical to ``client=None``; ``rigid={...}`` must
        keep ``mode="reference"`` without ``polish``. The demons batches of a streamed stack
        are tasks too (each reads its own frames; this process writes the store).
    scratch_dir : str or os.PathLike, optional
        Folder for the temporary frame store of a streamed ``"demons"`` (default: the
        system temporary folder; ``stemgpu run`` uses the output's folder).
    **stage_options : dict
        Options per stage, passed on: ``rigid={...}`` to :func:`stemgpu.register_rigid`,
        ``drift={...}`` to :func:`stemgpu.drift_report` (``frame_time``, ``model``, ...),
        ``demons={...}`` to :func:`stemgpu.register_demons`, ``cells={...}`` to
        :func:`stemgpu.unit_cells`, and ``atoms={...}`` with ``sigma``, ``threshold``,
        ``min_distance`` (peak finding), ``n_classes`` (intensity classes, default 2: A-
        and B-site), ``names``, ``edge_columns`` (default True: start and fit the O columns
        of a perovskite at the A-A edge midpoints) and ``model``, ``estimator``,
        ``window``, ``max_iter``, ``counts_per_unit`` (fitting); ``track={...}`` to
        :func:`stemgpu.track_columns` (``counts_per_unit`` of the frames, thresholds,
        ``batch_frames``) and :func:`stemgpu.frame_series` (``min_cells``, ``alpha``).

    Returns
    -------
    Analysis

    Raises
    ------
    ValueError
        Unknown steps, a missing calibration, a stack too small, or a stage that found
        nothing to work on (e.g. no atom columns); the message names the stage.
    TypeError
        Unknown stage options.

    Examples
    --------
    >>> import stemgpu
    >>> stack, truth = stemgpu.simulate_stack((4, 192, 192), frame_jitter_px=0.3, seed=0)
    >>> res = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid", "atoms", "cells"),
    ...                       progress=False)
    >>> res.statistics.n_cells > 20
    True
    >>> round(res.summary()["a1_length_pm"].value / 10) * 10  # SrTiO3: a = 390.5 pm
    390
    """
    steps = check_steps(steps)
    opts = check_options(stage_options)
    scratch_dir = _check_scratch_dir(scratch_dir)
    if lattice is not None:
        given = opts.setdefault("cells", {}).setdefault("lattice", lattice)
        if given is not lattice:
            raise ValueError(f"lattice= and cells={{'lattice': ...}} both given ({lattice!r}, "
                             f"{given!r}); give one")
    if client is not None:
        from .distributed import cluster_client, is_client

        if not is_client(client):  # start or connect to a cluster for this call only
            with cluster_client(client, say=print if progress else _silent) as connected:
                return analyze(stack, pixel_size=pixel_size, steps=steps, backend=backend,
                               progress=progress, lattice=lattice, client=connected,
                               scratch_dir=scratch_dir, **stage_options)
    prep = stages.prepare_input(stack, steps, pixel_size, backend)
    be = prep.backend
    info: dict[str, Any] = {"pixel_size_pm": prep.pixel_size_pm, "steps": list(steps),
                            "backend": be.name, "device": be.device_name,
                            "shape": list(prep.shape), "timings_s": {}, "options": opts,
                            "streamed": prep.streamed,
                            "quality_section": True}
    from ..io.provenance import source_of

    source = source_of(stack, checksum=False)  # a Dataset from stemgpu.open knows its file
    if source is not None:
        info["source"] = source
    results: dict[str, Any] = {"info": info}
    stores: list = []  # the frame stores of a streamed analysis (Analysis.close removes them)
    bar = progress_bar(progress, total=len(steps), desc="stemgpu", unit="stage", leave=False)
    clock = _Clock(info, bar)
    try:
        current, flagged = prep.data, None
        if "rigid" in steps:
            with clock.stage("rigid", "rigid registration"):
                results["rigid"], results["drift"], current, flagged = stages.rigid_stage(
                    prep, opts.get("rigid", {}), opts.get("drift", {}), progress,
                    client=client, streamed_mean="demons" not in steps)
        if "demons" in steps and prep.streamed:
            with clock.stage("demons", "demons registration"):
                demons, kept, current, store = stages.streamed_demons_stage(
                    prep, results["rigid"], opts.get("demons", {}), progress,
                    store_dir=scratch_dir, client=client)
                stores.append(store)
                if kept is not None:
                    info["demons_frames"] = kept
                results["demons"] = demons
                flagged = None
        elif "demons" in steps:
            with clock.stage("demons", "demons registration"):
                demons, kept = stages.demons_stage(current, flagged, be,
                                                   opts.get("demons", {}), progress)
                if kept is not None:
                    info["demons_frames"] = kept
                results["demons"] = demons
                current, flagged = demons.registered, None
        results["mean_image"] = stages.registered_mean(current, flagged, be)
        if "atoms" in steps:
            with clock.stage("atoms", "atom columns"):
                results["atoms"], results["species"] = stages.atoms_stage(
                    results["mean_image"], opts.get("atoms", {}), be,
                    cells_options=opts.get("cells", {}))
        if "cells" in steps:
            with clock.stage("cells", "unit cells"):
                results["cells"], results["statistics"] = stages.cells_stage(
                    results["atoms"], results["species"], prep.pixel_size_pm,
                    opts.get("cells", {}), names=opts.get("atoms", {}).get("names"))
        if "track" in steps:
            with clock.stage("track", "column tracking"):
                results["tracks"], results["frame_series"] = stages.track_stage(
                    prep, results["rigid"], results.get("demons"), results["atoms"],
                    results["species"], opts.get("track", {}), opts.get("cells", {}),
                    opts.get("atoms", {}).get("names"), progress, client=client)
    except BaseException:
        for store in stores:  # nothing refers to the frames written so far
            store.close()
        raise
    finally:
        bar.close()  # also on errors: no half-drawn bar before the message
    out = Analysis(results)
    out._stores = stores
    return out
