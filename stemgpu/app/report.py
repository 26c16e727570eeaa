"""Report figures of an :class:`~stemgpu.app.analysis.Analysis` (matplotlib, imported on use).

:func:`plot_report` draws one page: drift trajectory with its smooth fit and the jitter,
the registered mean with the refined columns, maps of tetragonal and shear distortion,
rotation and B-site displacement, and histograms of sides, angles and areas.
"""

from __future__ import annotations

import os

import numpy as np

from ..backend import to_host

__all__ = ["plot_columns", "plot_maps", "plot_report", "save_report"]

_SPECIES_COLOURS = {"A": "C3", "B": "C0", "O": "C2"}


def _mean_image(analysis):
    img = analysis.mean_image
    return None if img is None else to_host(img)


def plot_columns(analysis, ax=None, *, markersize: float = 6.0):
    """The registered mean with the converged column fits marked by species.

    Parameters
    ----------
    analysis : Analysis
    ax : matplotlib Axes, optional
        Drawn into; a new 6 x 6 in figure otherwise.
    markersize : float

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((192, 192), seed=0)
    >>> res = stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"), progress=False)
    >>> from stemgpu.app.report import plot_columns
    >>> fig = plot_columns(res)
    >>> sorted(t.get_text().split()[0] for t in fig.axes[0].get_legend().get_texts())
    ['A', 'B', 'O', 'flagged']
    """
    import matplotlib.pyplot as plt

    img = _mean_image(analysis)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    if img is not None:
        ax.imshow(img, cmap="gray")
    fit = analysis.atoms
    if fit is not None:
        ok = to_host(fit.status) == 0
        pos = to_host(fit.positions)
        species = np.asarray(analysis.species) if analysis.species is not None \
            else np.full(len(pos), "A")
        for name in sorted(set(species[ok])):
            sel = ok & (species == name)
            ax.plot(pos[sel, 1], pos[sel, 0], "+", ms=markersize, mew=1.0,
                    color=_SPECIES_COLOURS.get(name, "C4"), label=f"{name} ({int(sel.sum())})")
        bad = ~ok
        if bad.any():
            p = np.where(np.isfinite(pos), pos, np.nan)[bad]
            ax.plot(p[:, 1], p[:, 0], "x", ms=markersize, color="yellow",
                    label=f"flagged ({int(bad.sum())})")
        ax.legend(fontsize="small", loc="upper right")
    ax.set_title("registered mean, refined columns")
    ax.set_axis_off()
    return ax.figure


def plot_maps(analysis, axes=None):
    """Maps of tetragonal distortion, shear, rotation and B-site displacement (4 panels).

    Parameters
    ----------
    analysis : Analysis
        With the ``"cells"`` step.
    axes : four matplotlib Axes, optional
        Drawn into; a new 2 x 2 figure otherwise.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        The analysis has no unit cells.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((192, 192), seed=0)
    >>> res = stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"), progress=False)
    >>> from stemgpu.app.report import plot_maps
    >>> fig = plot_maps(res)
    >>> [ax.get_title() for ax in fig.axes if ax.get_title()]  # (colour bars have none)
    ['tetragonal distortion', 'shear distortion', 'rotation (deg)', 'B-site displacement (x...)']
    """
    import matplotlib.pyplot as plt

    from ..lattice.plot import plot_bsite_displacement, plot_cell_map

    cells = analysis.cells
    if cells is None:
        raise ValueError("plot_maps needs the 'cells' step; it was not run")
    if axes is None:
        _, axes = plt.subplots(2, 2, figsize=(11, 10))
    axes = np.asarray(axes).ravel()
    img = _mean_image(analysis)
    px = analysis.pixel_size_pm
    for ax, q, title in zip(axes[:3], ("tetragonal", "shear", "rotation_deg"),
                            ("tetragonal distortion", "shear distortion", "rotation (deg)"),
                            strict=True):
        plot_cell_map(cells, q, image=img, ax=ax, pixel_size=px)
        ax.set_title(title)
        ax.set_axis_off()
    ok = to_host(cells.bsite_index) >= 0
    d = to_host(cells.bsite_displacement)[ok] * px
    typical = float(np.median(np.linalg.norm(d, axis=1))) if ok.any() else 1.0
    side = float(np.median(to_host(cells.smallest_side)))
    # Magnify so the median arrow is 60 % of a cell; no image underneath (arrows stay legible).
    scale = max(1.0, 0.6 * side * px / max(typical, 1e-3))
    plot_bsite_displacement(cells, ax=axes[3], scale=scale, pixel_size=px)
    axes[3].set_title(f"B-site displacement (x{scale:.0f})")
    axes[3].set_axis_off()
    return axes[0].figure


def _histograms(analysis, axes):
    from ..lattice.plot import cell_values

    cells = analysis.cells
    px = analysis.pixel_size_pm
    for ax, name in zip(axes, ("smallest_side", "longest_side", "angle_deviation_deg", "area"),
                        strict=True):
        v, label = cell_values(cells, name, pixel_size=px)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            ax.set_visible(False)
            continue
        ax.hist(v, bins=30, color="0.6")
        med = float(np.median(v))
        ax.axvline(med, color="C3", label=f"median {med:.4g}")
        ax.set_xlabel(label)
        ax.legend(fontsize="small")


def plot_tracks(analysis, axes=None):
    """Column tracking: scatter map, calibration ratios and the lattice over the frames.

    Three panels: the registered mean with every tracked column coloured by its frame
    scatter over its predicted error (flagged columns ringed in red); the calibration ratio
    per species with its 68 % interval (1 means the error bars are right); the median
    ``|a1|`` and ``|a2|`` per frame with their uncertainties and fitted trends.

    Parameters
    ----------
    analysis : Analysis
        With the ``"track"`` step.
    axes : sequence of 3 matplotlib Axes, optional

    Returns
    -------
    list of matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stemgpu
    >>> stack, truth = stemgpu.simulate_stack((5, 128, 128), seed=2)
    >>> res = stemgpu.analyze(stack, pixel_size=14.6, progress=False,
    ...                       steps=("rigid", "atoms", "cells", "track"))
    >>> from stemgpu.app.report import plot_tracks
    >>> len(plot_tracks(res))
    3
    """
    import matplotlib.pyplot as plt

    tracks = analysis.tracks
    if tracks is None:
        raise ValueError("plot_tracks needs the 'track' step; it was not run")
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(16, 5), layout="constrained")
    ax_map, ax_cal, ax_ser = axes
    ax_map.imshow(to_host(_mean_image(analysis)), cmap="gray")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(np.mean(np.square(tracks.scatter / tracks.predicted), axis=1))
    pos = tracks.mean_positions
    art = ax_map.scatter(pos[:, 1], pos[:, 0], c=ratio, cmap="coolwarm", vmin=0.5, vmax=1.5,
                         s=10)
    bad = tracks.column_flags != 0
    ax_map.scatter(tracks.positions[0, bad, 1], tracks.positions[0, bad, 0], s=60,
                   facecolors="none", edgecolors="red", label=f"flagged ({int(bad.sum())})")
    ax_map.figure.colorbar(art, ax=ax_map, label="frame scatter / predicted error")
    ax_map.set_title(f"{pos.shape[0]} columns tracked over {tracks.n_frames} frames")
    ax_map.legend(loc="lower right", fontsize="small")
    ax_map.set_axis_off()
    names = list(tracks.calibration)
    vals = [tracks.calibration[n].ratio for n in names]
    lo = [tracks.calibration[n].ratio - tracks.calibration[n].low for n in names]
    hi = [tracks.calibration[n].high - tracks.calibration[n].ratio for n in names]
    ax_cal.bar(names, vals, yerr=[lo, hi], color="0.7", capsize=6)
    ax_cal.axhline(1.0, color="C3", lw=1)
    ax_cal.set_ylabel("calibration ratio")
    ax_cal.set_title("error bars against the frames (1 = right)")
    series = analysis.frame_series
    if series is None:
        ax_ser.text(0.5, 0.5, tracks.parameters.get("frame_series", "no frame series"),
                    ha="center", va="center", wrap=True, transform=ax_ser.transAxes)
        ax_ser.set_axis_off()
        return list(axes)
    for key, label in (("a1_length_pm", "|a1|"), ("a2_length_pm", "|a2|")):
        if key not in series.values:
            continue
        t = series.trends[key]
        ax_ser.errorbar(series.frames, series.values[key], yerr=series.uncertainties[key],
                        fmt="o", ms=4, label=f"{label}: {t.slope:+.3g} +/- "
                                             f"{t.slope_error:.2g} pm/frame")
        f = np.asarray(series.frames, dtype=float)
        ax_ser.plot(f, t.level + t.slope * (f - f.mean()), color="0.3", lw=1)
    ax_ser.set_xlabel("frame")
    ax_ser.set_ylabel("median side (pm)")
    ax_ser.set_title("lattice over the frames")
    ax_ser.legend(fontsize="small")
    return list(axes)


def plot_report(analysis, path=None, *, dpi: int = 110):
    """One-page report of an analysis; panels for the stages that ran.

    Parameters
    ----------
    analysis : Analysis
    path : str or os.PathLike, optional
        Save the figure here (PNG by extension), written to a temporary name and renamed.
    dpi : int

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((192, 192), seed=0)
    >>> res = stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"), progress=False)
    >>> from stemgpu.app.report import plot_report
    >>> fig = plot_report(res, "report.png")
    >>> import os; os.path.exists("report.png")
    True
    """
    import matplotlib.pyplot as plt

    has_cells = analysis.cells is not None
    has_tracks = analysis.tracks is not None
    heights = [1.3] + ([1.3, 0.8] if has_cells else []) + ([1.0] if has_tracks else [])
    height = 4.2 + 10.8 * has_cells + 4.5 * has_tracks
    fig = plt.figure(figsize=(16, height))
    rows = len(heights)
    # Fixed margins (in inches, so they hold for every page height) instead of the
    # constrained layout engine, which re-laid out every text for ~half the drawing time.
    grid = fig.add_gridspec(rows, 4, height_ratios=heights, left=0.05, right=0.97,
                            bottom=0.6 / height, top=1 - 0.9 / height, wspace=0.35,
                            hspace=1.6 / height * rows / 1.5)
    ax_drift = fig.add_subplot(grid[0, 0:2])
    ax_cols = fig.add_subplot(grid[0, 2:4])
    if analysis.drift is not None:
        analysis.drift.plot(ax=ax_drift)
        j = analysis.drift.jitter_std_pm
        ax_drift.set_title(f"drift and jitter: jitter std x {j.x:.2f} pm, y {j.y:.2f} pm")
    else:
        ax_drift.set_visible(False)
    plot_columns(analysis, ax=ax_cols)
    if has_cells:
        maps = [fig.add_subplot(grid[1, k]) for k in range(4)]
        plot_maps(analysis, axes=maps)
        hists = [fig.add_subplot(grid[2, k]) for k in range(4)]
        _histograms(analysis, hists)
    if has_tracks:
        plot_tracks(analysis, axes=[fig.add_subplot(grid[rows - 1, 0:2]),
                                    fig.add_subplot(grid[rows - 1, 2]),
                                    fig.add_subplot(grid[rows - 1, 3])])
    info = analysis.info or {}
    fig.suptitle(f"stemgpu report: {info.get('shape')} at {analysis.pixel_size_pm:g} pm/px, "
                 f"backend {info.get('backend')}", y=1 - 0.25 / height)
    if path is not None:
        path = os.fspath(path)
        root, ext = os.path.splitext(path)
        tmp = f"{root}.tmp-{os.getpid()}{ext or '.png'}"
        try:
            fig.savefig(tmp, dpi=dpi)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return fig


def save_report(analysis, path) -> str:
    """Draw the report of ``analysis`` into ``path`` without a display; returns the path.

    For scripts and the command line: selects the non-interactive Agg backend unless one is
    already in use, and closes the figure afterwards.

    Parameters
    ----------
    analysis : Analysis
    path : str or os.PathLike
        PNG (or any matplotlib format, by extension); written completely or not at all.

    Returns
    -------
    str
        The absolute path written.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((192, 192), seed=0)
    >>> res = stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"), progress=False)
    >>> from stemgpu.app.report import save_report
    >>> save_report(res, "report.png").endswith("report.png")
    True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.close(plot_report(analysis, path))
    return os.path.abspath(os.fspath(path))
