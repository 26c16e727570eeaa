"""The named passes of :func:`stemgpu.atoms.fit.fit_atoms`, each fitting through an engine.

``fit_atoms`` is validation plus this sequence (all on the backend of the data, no loop over
columns or frames):

1. :func:`prepare_columns`: window origins, gathered windows, flat-window flags, start values;
2. :func:`plain_pass`: one isotropic fit per window;
3. :func:`neighbour_pass` (twice, ``neighbours="subtract"``): refit with the fitted peaks of
   all other columns (and guessed peaks of edge columns) as a known offset;
4. :func:`refit_fixed_width`: failed or implausibly wide / narrow fits refitted with the width
   held at the median;
5. :func:`elliptical_pass` (``model="elliptical"``): the elliptical fit from the round one;
6. :func:`rescale_to_estimated_gain`: errors on the gain estimated from the residuals.

Every pass takes the :class:`~stemgpu.atoms.engines.FitEngine` of the call and the
:class:`Columns` of :func:`prepare_columns`, and works on any subset of columns given what the
earlier passes produced.

Dark contrast (ABF): ``Columns.iso`` is then the isotropic *dip* model (``mu = B - A G``,
:func:`~stemgpu.atoms.models.with_contrast`); start amplitudes are the background minus the
centre, neighbouring and edge columns enter each window as negative offsets, and the gain
estimate is unchanged (it uses the model's mean, whatever its sign).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .lm import LMOutput
from .models import (
    CONVERGED,
    FLAT,
    MAX_ITER,
    OUT_OF_BOUNDS,
    SINGULAR,
    get_model,
    with_contrast,
)
from .windows import extract_windows, render_peaks, render_radius, window_origins

#: Every fit starts isotropic; the neighbour model and the held-width refits use it too
#: (its dark variant for dark contrast: :func:`iso_model`).
ISO = get_model("gaussian")


def iso_model(contrast="bright"):
    """The isotropic model of ``contrast`` (``"bright"``: :data:`ISO`; ``"dark"``: its dips)."""
    return with_contrast(ISO, contrast)
#: Plausible fitted widths, as multiples of the expected column width ``sigma``.
PLAUSIBLE_WIDTH = (0.67, 1.5)
#: Neighbour refits of ``neighbours="subtract"``.
SUBTRACT_PASSES = 2
#: Iteration cap of the plain pass when neighbour refits follow it: there it only gives the
#: neighbour model and the refits' start. Without the neighbours in its model a column
#: whose window holds their flanks crawls: on SrTiO3 at sigma 6 px (1024^2, 1,301 columns)
#: 352 plain fits ran all 50 iterations (half the pass's work); capped at 20 they end as
#: MAX_ITER (still used), and the final positions' RMS and z spread stay the same (0.039 /
#: 0.072 px for Sr / TiO, z std 0.93 / 0.92 with or without the cap).
PROVISIONAL_ITER = 20


@dataclass(frozen=True)
class Columns:
    """The columns of one ``fit_atoms`` call.

    ``positions``, ``frames`` and ``status`` cover every column of every frame (flattened,
    ``M_total``); the other arrays cover the fittable ones, rows ``idx`` of those (``M``).
    ``status`` is -1 where a column is fitted, else the code saying why it is not.
    """

    stack: Any  # (F, H, W) data
    positions: Any  # (M_total, 2) given positions
    frames: Any  # (M_total,) frame of each column
    status: Any  # (M_total,) int8
    idx: Any  # (M,) fitted rows
    windows: Any  # (M, k, k)
    pos: Any  # (M, 2) given positions of the fitted rows
    fit_frames: Any  # (M,)
    origins: Any  # (M, 2) int64 window origins
    org: Any  # (M, 2) the same as float64
    init: Any  # (M, 5) isotropic start values
    k: int
    sigma: float
    xp: Any
    iso: Any = ISO  # the isotropic model of the call's contrast


def prepare_columns(stack, pos, k, sigma, xp, iso=ISO) -> Columns:
    """Windows and start values of the columns ``pos`` ((F, N, 2) host array) in ``stack``;
    ``iso`` the isotropic model of the contrast (:func:`iso_model`)."""
    f_n, h, w = stack.shape
    flat_pos = xp.asarray(pos.reshape(-1, 2))
    frames = xp.repeat(xp.arange(f_n), pos.shape[1])
    origins, status = window_origins(flat_pos, k, (h, w), xp)
    wins = extract_windows(stack, frames, origins, k, xp)
    flat = (wins.max(axis=(1, 2)) - wins.min(axis=(1, 2))) <= 0
    status = xp.where((status == -1) & flat, FLAT, status).astype(xp.int8)
    idx = xp.nonzero(status == -1)[0]  # the fits to run (one host sync)
    windows, fit_pos = wins[idx], flat_pos[idx]
    return Columns(stack=stack, positions=flat_pos, frames=frames, status=status, idx=idx,
                   windows=windows, pos=fit_pos, fit_frames=frames[idx], origins=origins[idx],
                   org=origins[idx].astype(xp.float64),
                   init=initial_guess(windows, fit_pos, k, sigma, xp, iso.sign), k=k,
                   sigma=sigma, xp=xp, iso=iso)


def plain_pass(engine, cols, gain, max_iter=None) -> LMOutput:
    """One isotropic fit per window from the start values (at most ``max_iter`` iterations
    when given and below the engine's: :data:`PROVISIONAL_ITER` before neighbour refits)."""
    if max_iter is not None and max_iter < engine.max_iter:
        engine = dataclasses.replace(engine, max_iter=int(max_iter))
    return engine.fit(cols.windows, cols.origins, cols.init, model=cols.iso, gain=gain,
                      frame_index=cols.fit_frames)


def neighbour_pass(engine, cols, out, guess, gain, error_scale):
    """Refit every window with all other columns' peaks as a known offset.

    Untrusted fits (e.g. two overlapping columns merged into one) enter their neighbours'
    models at ``guess`` instead of the failed fit, and restart from a new guess on the
    window minus its neighbours. ``error_scale`` puts errors computed with a provisional gain
    on ``gain``. Returns the new fits, the new guesses and the offsets (M, k, k).
    """
    xp = cols.xp
    ok = plausible(out, cols.init, cols.sigma)
    nat = xp.where(ok[:, None], out.params, guess)
    # Faint columns' widths are noise; their errors would leak into neighbours.
    nat = steady_widths(nat, out, ok, cols.sigma, error_scale, xp)
    offset = neighbour_offsets(cols.iso, nat, cols, ok)
    guess = initial_guess(cols.windows - offset.astype(cols.windows.dtype), cols.pos, cols.k,
                          cols.sigma, xp, cols.iso.sign)
    out = engine.fit(cols.windows, cols.origins, xp.where(ok[:, None], out.params, guess),
                     model=cols.iso, gain=gain, offset=offset, frame_index=cols.fit_frames)
    return out, guess, offset


def reference_pass(engine, cols, ref_nat, gain):
    """Every window fitted once against a reference fit of the same columns (e.g. on the
    registered mean of these frames): started from the reference's parameters, with the
    reference's peaks of all other columns as the known offset.

    ``ref_nat`` (M, 5) are the reference's isotropic parameters of the fitted rows (NaN where
    the reference has none: those start from the window guess and stay out of the offset).
    The reference is better determined than any one frame, so its neighbour model adds
    less noise than one fitted on the frame itself, and the fits start near their end.
    Returns the fits and the offsets (M, k, k).
    """
    xp = cols.xp
    ok = xp.isfinite(ref_nat).all(axis=1)
    nat = xp.where(ok[:, None], ref_nat, cols.init)
    peaks = xp.where(ok[:, None], ref_nat, xp.nan)
    offset = shared_offsets(cols.iso, peaks, cols, ok)
    if offset is None:
        offset = neighbour_offsets(cols.iso, peaks, cols, ok)
    out = engine.fit(cols.windows, cols.origins, nat, model=cols.iso, gain=gain, offset=offset,
                     frame_index=cols.fit_frames)
    return out, offset


def refit_fixed_width(engine, cols, out, gain, offset):
    """Refit failed or implausibly wide/narrow isotropic fits with the width held.

    At low dose a faint column (O beside Sr) carries too little signal to pin its width, and
    a free-width fit can run to the window edge. Holding the width at the median of the
    trusted fits (all columns share the probe) keeps position, amplitude and background
    estimable. Only refits that converge replace the original result. Returns the fits and
    the mask of the rows replaced.
    """
    xp, k, wi = cols.xp, cols.k, ISO.widths[0]
    s_fit = out.params[:, wi]
    good = (out.status == CONVERGED) & width_plausible(s_fit, cols.sigma)
    fixed_rows = xp.zeros(out.status.shape, dtype=bool)
    if not bool(good.any()):
        return out, fixed_rows
    s_ref = float(xp.median(s_fit[good]))
    sel = xp.nonzero(~good & (out.status != SINGULAR))[0]
    if int(sel.size) == 0:
        return out, fixed_rows
    # A smaller window (+-1.25 sigma) keeps the shot noise of bright neighbours' flanks out.
    ks = min(k, 2 * int(np.ceil(1.25 * s_ref)) + 1)
    c0 = (k - ks) // 2
    sub = cols.windows[sel][:, c0:c0 + ks, c0:c0 + ks]
    off = None if offset is None else offset[sel][:, c0:c0 + ks, c0:c0 + ks]
    w = sub if off is None else sub - off.astype(sub.dtype)
    start = initial_guess(w, cols.pos[sel], ks, s_ref, xp, cols.iso.sign)
    start[:, wi] = s_ref
    fixed = xp.zeros(start.shape, dtype=bool)
    fixed[:, wi] = True
    re = engine.fit(sub, cols.org[sel] + c0, start, model=cols.iso, gain=gain, offset=off,
                    fixed=fixed, frame_index=cols.fit_frames[sel])
    take = re.status == CONVERGED
    rows = sel[take]
    fixed_rows[rows] = True
    return with_rows(out, rows, LMOutput(*(f[take] for f in re))), fixed_rows


def elliptical_pass(engine, cols, mdl, out, gain, offset, fixed_rows) -> LMOutput:
    """Fit ``mdl`` (elliptical) from the isotropic fits ``out`` (round start).

    Held-width fits stay round with their width held (a free elliptical refit would undo the
    hold that made them converge).
    """
    xp = cols.xp
    start = xp.where(usable(out)[:, None], out.params, cols.init)
    # Round start: sigma_1 = sigma_2, angle 0; the damping floor keeps the angle finite.
    ell = elliptical_from_iso(mdl, start, xp)
    s = start[:, ISO.widths[0]]
    ell[:, mdl.widths[0]], ell[:, mdl.widths[1]] = s * 1.02, s / 1.02
    ell_out = engine.fit(cols.windows, cols.origins, ell, model=mdl, gain=gain, offset=offset,
                         frame_index=cols.fit_frames)
    if bool(fixed_rows.any()):
        ell_out = round_elliptical(mdl, ell_out, out, fixed_rows, xp)
    return ell_out


def rescale_to_estimated_gain(mdl, out, cols, offset, gain):
    """Errors on the gain estimated from the residuals (the Fisher information is
    proportional to the gain); ``(out, gain)`` unchanged when it cannot be estimated."""
    est = gain_from(mdl, out, cols, offset)
    if est is None:
        return out, gain
    scale = gain / est
    out = out._replace(covariance=out.covariance * scale,
                       param_errors=out.param_errors * np.sqrt(scale))
    return out, est


# --- helpers ------------------------------------------------------------------------------

def iso_params(amplitude, row, col, sigma, background, xp):
    """Isotropic parameter rows (M, P) from columns, placed at the registry's indices."""
    cols = [None] * ISO.n_params
    cols[ISO.amplitude], cols[ISO.background] = amplitude, background
    cols[ISO.position[0]], cols[ISO.position[1]], cols[ISO.widths[0]] = row, col, sigma
    return xp.stack(cols, axis=1)


def elliptical_from_iso(mdl, iso, xp):
    """Rows of ``mdl`` with the isotropic rows' amplitude, position, width (every width) and
    background; angle 0."""
    out = xp.zeros((iso.shape[0], mdl.n_params))
    out[:, _iso_to(mdl, xp)] = iso
    for i in mdl.widths[1:]:
        out[:, i] = iso[:, ISO.widths[0]]
    return out


def _iso_to(mdl, xp):
    """Index in ``mdl`` of each isotropic parameter (its first width for the width)."""
    idx = [0] * ISO.n_params
    idx[ISO.amplitude], idx[ISO.background] = mdl.amplitude, mdl.background
    idx[ISO.position[0]], idx[ISO.position[1]] = mdl.position
    idx[ISO.widths[0]] = mdl.widths[0]
    return xp.asarray(idx)


def with_rows(out, rows, new):
    """``out`` with its entries at ``rows`` replaced by those of ``new`` (one per row)."""
    merged = []
    for old, value in zip(out, new, strict=True):
        old = old.copy()
        old[rows] = value
        merged.append(old)
    return LMOutput(*merged)


def round_elliptical(mdl, ell_out, iso_out, rows, xp):
    """Elliptical results for ``rows`` from isotropic ones: s1 = s2 = s, angle undefined
    (error inf)."""
    emap = _iso_to(mdl, xp)
    r = xp.nonzero(rows)[0]
    iso = LMOutput(*(f[r] for f in iso_out))
    p, n = mdl.n_params, len(r)
    p_new = elliptical_from_iso(mdl, iso.params, xp)
    e_new, c_new = xp.zeros((n, p)), xp.zeros((n, p, p))
    e_new[:, emap] = iso.param_errors
    c_new[:, emap[:, None], emap[None, :]] = iso.covariance
    e_new[:, mdl.angle] = xp.inf
    c_new[:, mdl.angle, mdl.angle] = xp.inf
    return with_rows(ell_out, r, iso._replace(params=p_new, param_errors=e_new,
                                              covariance=c_new))


def steady_widths(nat, out, ok, sigma, error_scale, xp):
    """Neighbour models with poorly determined widths drawn at the median trusted width.

    A faint column's fitted width scatters by tens of percent at usual doses; drawn into its
    bright neighbours' windows, that scatter becomes extra position noise of the bright
    columns (measured: 1.11x / 1.13x the Cramér-Rao bound for Sr / Ti-O with free widths,
    1.02x with the true neighbour parameters, 1.03x / 1.05x with this). Widths known to
    better than 5 % are kept: species whose columns really differ in width keep theirs.
    """
    if not bool(ok.any()):
        return nat
    wi = ISO.widths[0]
    s_ref = float(xp.median(out.params[ok, wi]))
    # error_scale puts errors computed with a provisional gain on the data's gain, so the
    # choice does not depend on the units of the image.
    noisy = ~(out.param_errors[:, wi] * error_scale < 0.05 * sigma)
    nat = nat.copy()
    nat[:, wi] = xp.where(noisy, s_ref, nat[:, wi])
    return nat


def usable(out):
    """Fits that finished (converged or ran out of iterations)."""
    return (out.status == CONVERGED) | (out.status == MAX_ITER)


def width_plausible(s, sigma):
    """Widths within :data:`PLAUSIBLE_WIDTH` times ``sigma`` (strictly)."""
    return (s > PLAUSIBLE_WIDTH[0] * sigma) & (s < PLAUSIBLE_WIDTH[1] * sigma)


def initial_guess(wins, pos, k, sigma, xp, sign=1):
    """Background from the window border median, amplitude from the centre 3 x 3 mean: the
    peak above the background (``sign`` +1), or for dips (``sign`` -1) the background minus
    the centre, kept below 95 % of the background so the start has ``mu > 0``."""
    border = xp.concatenate([wins[:, 0, :], wins[:, -1, :], wins[:, 1:-1, 0],
                             wins[:, 1:-1, -1]], axis=1)
    bg = xp.median(border, axis=1).astype(xp.float64)
    c = k // 2
    peak = wins[:, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2)).astype(xp.float64)
    span = (wins.max(axis=(1, 2)) - wins.min(axis=(1, 2))).astype(xp.float64)
    amp = xp.maximum(sign * (peak - bg), 0.25 * span)
    if sign < 0:
        amp = xp.where(bg > 0, xp.minimum(amp, 0.95 * bg), amp)
    return iso_params(amp, pos[:, 0], pos[:, 1], xp.full(pos.shape[0], sigma), bg, xp)


def plausible(out, init, sigma):
    """Fits trusted as neighbours: finished, moved < sigma/2 from the start, width in range."""
    rc = list(ISO.position)
    moved = ((out.params[:, rc] - init[:, rc]) ** 2).sum(axis=1)
    return usable(out) & (moved < (0.5 * sigma) ** 2) & width_plausible(
        out.params[:, ISO.widths[0]], sigma)


def edge_peaks(cols, nat, ok, fitted):
    """Guessed peaks of columns too close to the image edge for a window, or None.

    Their flux reaches the windows of the next columns inwards; left out of the neighbour
    model it pulls those columns outwards (measured on a noise-free SrTiO3 image: O columns
    one cell from the edge 0.88 px off without these peaks). Amplitude from the 3 x 3 mean
    at the given position minus the fitted peaks there (``fitted``, (F, H, W), or (1, H, W)
    when they are the same in every frame) and the median fitted background (the background
    minus that mean for dips: ``cols.iso.sign`` -1); width the median fitted width. Returns
    (params, frames).
    """
    xp, stack, pos, frames = cols.xp, cols.stack, cols.positions, cols.frames
    f_n, h, w = stack.shape
    edge = (cols.status == OUT_OF_BOUNDS) & xp.isfinite(pos).all(axis=1)
    # "Inside the image" as in window_origins: pixel centres +- 0.5
    edge &= (pos[:, 0] >= -0.5) & (pos[:, 0] <= h - 0.5) & (pos[:, 1] >= -0.5) & (
        pos[:, 1] <= w - 0.5)
    rows = xp.nonzero(edge)[0]
    if int(rows.size) == 0 or not bool(ok.any()):
        return None
    p = pos[rows]
    r0 = xp.rint(p).astype(xp.int64)
    d = xp.arange(-1, 2)
    rr = xp.clip(r0[:, 0, None, None] + d[None, :, None], 0, h - 1)
    cc = xp.clip(r0[:, 1, None, None] + d[None, None, :], 0, w - 1)
    fr = frames[rows][:, None, None]
    fr_fit = fr if fitted.shape[0] == f_n else xp.zeros_like(fr)  # one shared frame
    peak = (stack[fr, rr, cc].astype(xp.float64) - fitted[fr_fit, rr, cc]).mean(axis=(1, 2))
    bg = float(xp.median(nat[ok, ISO.background]))
    amp = xp.maximum(cols.iso.sign * (peak - bg), 0.0)
    sig = xp.full(amp.shape, float(xp.median(nat[ok, ISO.widths[0]])))
    guess = iso_params(amp, p[:, 0], p[:, 1], sig, xp.zeros_like(amp), xp)
    keep = amp > 0
    return guess[keep], frames[rows][keep]


def neighbour_offsets(mdl, nat, cols, ok):
    """Peaks of all *other* columns (params ``nat``) on each window, data units, (M, k, k),
    with the guessed peaks of the columns too close to the image edge to be fitted (see
    :func:`edge_peaks`; ``ok`` marks the fits trusted for their median width and background).
    """
    xp, k, shape = cols.xp, cols.k, cols.stack.shape
    radius = _radius(mdl, nat, k, xp)
    full = render_peaks(mdl, nat, cols.fit_frames, shape, radius, xp)
    extra = edge_peaks(cols, nat, ok, full)
    if extra is not None and int(extra[0].shape[0]):
        full += render_peaks(mdl, extra[0], extra[1], shape, radius, xp)
    wins = extract_windows(full, cols.fit_frames, cols.origins, k, xp)
    return wins - own_peaks(mdl, nat, cols.org, k, xp)


def shared_offsets(mdl, nat, cols, ok):
    """:func:`neighbour_offsets` for peaks that are the same in every frame (the reference
    fit of :func:`reference_pass`), rendered once instead of once per frame; None where
    that does not hold.

    It holds when every frame fits the same columns at the same given positions with the
    same ``nat``: the offsets of frame 0's windows then serve every frame, and only the
    guessed edge peaks (their amplitude is read from each frame) are rendered per frame.
    The offsets equal :func:`neighbour_offsets`'s up to rounding (the same terms, summed in
    another grouping).
    """
    xp, k = cols.xp, cols.k
    f_n, h, w = cols.stack.shape
    m_total, m = int(cols.status.shape[0]), int(cols.idx.shape[0])
    if f_n < 2 or m_total % f_n or m % f_n:
        return None
    n, m0 = m_total // f_n, m // f_n
    fitted = (cols.status == -1).reshape(f_n, n)
    pos = cols.positions.reshape(f_n, n, 2)
    # NaN positions fail the comparison and take the general path (as they should: they are
    # not fitted and their frames may differ).
    if not bool((fitted == fitted[:1]).all()) or not bool((pos == pos[:1]).all()):
        return None
    same = nat.reshape(f_n, m0, -1)
    if not bool(((same == same[:1]) | (xp.isnan(same) & xp.isnan(same[:1]))).all()):
        return None
    radius = _radius(mdl, nat, k, xp)
    nat0, zero = nat[:m0], xp.zeros(m0, dtype=xp.int64)
    full = render_peaks(mdl, nat0, zero, (1, h, w), radius, xp)
    wins = extract_windows(full, zero, cols.origins[:m0], k, xp)
    offset = xp.tile(wins - own_peaks(mdl, nat0, cols.org[:m0], k, xp), (f_n, 1, 1))
    extra = edge_peaks(cols, nat, ok, full)
    if extra is not None and int(extra[0].shape[0]):
        edge = render_peaks(mdl, extra[0], extra[1], cols.stack.shape, radius, xp)
        # Edge peaks lie within k/2 of the border and reach ``radius`` further: only the
        # windows in that band can see them.
        reach = k + radius + 1
        o = cols.origins
        near = xp.nonzero((o[:, 0] < reach) | (o[:, 1] < reach) | (o[:, 0] + k > h - reach)
                          | (o[:, 1] + k > w - reach))[0]
        offset[near] += extract_windows(edge, cols.fit_frames[near], o[near], k, xp)
    return offset


def _radius(mdl, nat, k, xp):
    """Render radius for peaks ``nat`` on k x k windows (see :func:`render_radius`)."""
    good = xp.isfinite(nat).all(axis=1)
    sig_max = float(xp.nanmax(xp.where(good[:, None], nat[:, list(mdl.widths)], xp.nan)))
    return render_radius(k, min(sig_max, k))


def own_peaks(mdl, nat, org, k, xp):
    """Each row's own peak (background excluded) on its k x k window, (M, k, k); 0 for rows
    with non-finite parameters (they are not rendered either)."""
    good = xp.isfinite(nat).all(axis=1)
    t = mdl.to_internal(xp.where(good[:, None], nat, 1.0), org, 1.0, xp)
    t[:, mdl.background] = 0.0
    own = mdl.value_on_grid(t, k, xp).reshape(-1, k, k)
    return xp.where(good[:, None, None], own, 0.0)


def gain_from(mdl, out, cols, offset):
    """Counts per data unit from the Poisson variance-to-mean relation of the residuals of
    the converged fits, or None."""
    xp = cols.xp
    good = out.status == CONVERGED
    if not bool(good.any()):
        return None
    t = mdl.to_internal(xp.where(good[:, None], out.params, 1.0), cols.org, 1.0, xp)
    mu = mdl.value_on_grid(t, cols.k, xp)
    if offset is not None:
        mu = mu + offset.reshape(mu.shape)
    wins = cols.windows
    n = wins.shape[1] * wins.shape[2]
    r = (wins.reshape(wins.shape[0], -1) - mu)[good]
    m = mu[good]
    num = float(m.sum()) * (n - mdl.n_params) / n
    den = float((r * r).sum())
    if not (den > 0 and num > 0):
        return None
    return num / den
