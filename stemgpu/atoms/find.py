"""Candidate atom-column positions: band-pass filter, local maxima, sub-pixel refinement.

Dark-contrast images (ABF / BF: columns darker than the background) are searched for minima:
the same pipeline runs on the negated image (finding candidates is no Poisson fit, so the
sign can be flipped here; the fit itself models dips, see :func:`stemgpu.fit_atoms`).
:func:`detect_contrast` tells the two apart from the image.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_choice, fail
from .._inputs import as_image
from ..backend import HostCopyMixin
from .models import CONTRASTS

__all__ = ["FoundAtoms", "detect_contrast", "estimate_sigma", "find_atoms"]

#: :func:`detect_contrast` ignores trial scales below this (px): single-pixel shot noise,
#: not columns.
_CONTRAST_MIN_SCALE = 1.0


#: Side (px) of the region the column width is measured on at full resolution: the probe is
#: the same over the image, and 512 x 512 px of an atomic-resolution image hold hundreds of
#: columns. Coarser levels of the scale space use :data:`_LEVEL_REGION` level px.
SIGMA_REGION = 512
_LEVEL_REGION = 256
#: Scales below this (px) stay on levels with >= _LEVEL_REGION px per side where the image
#: allows (a percentile over few coarse pixels is noisy: measured 10 % off at 384^2 and
#: sigma 6 px on a 128^2 level); wider scales are never a column width here and only have to
#: score below it, so they take the coarse levels regardless.
_FREE_SCALE = 16.0


@dataclass(frozen=True)
class FoundAtoms(HostCopyMixin):
    """Candidate columns: ``positions`` (N, 2) sub-pixel (row, col) and band-passed peak
    ``intensities`` (N,), brightest first (deepest first for dark contrast); ``sigma`` the
    column width (px) the search used (given or estimated, see
    ``parameters["sigma_estimated"]``) and ``contrast`` the contrast searched for
    (``"bright"`` or ``"dark"``; ``parameters["contrast_chosen"]`` says whether it was given
    or chosen by ``"auto"``), for the fit to reuse. Unpacks as ``positions, intensities``."""

    positions: Any
    intensities: Any
    parameters: dict = field(default_factory=dict)
    sigma: float | None = None
    contrast: str | None = None

    def __iter__(self):
        return iter((self.positions, self.intensities))


def _block_mean(img, f, xp):
    """Mean over f x f blocks (the image cropped to a multiple of f)."""
    if f == 1:
        return img
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _busiest_centre(img, size, xp):
    """Centre (row, col) of the ``size`` x ``size`` region (of a 3 x 3 grid of candidates:
    corners, edge centres, centre) whose 4 x 4 block means vary most: columns, not vacuum or
    a flat support."""
    h, w = img.shape
    sh, sw = min(h, size), min(w, size)
    if sh == h and sw == w:
        return h // 2, w // 2
    coarse = _block_mean(img, 4, xp)
    best, best_var = None, -1.0
    for r0 in sorted({0, (h - sh) // 2, h - sh}):
        for c0 in sorted({0, (w - sw) // 2, w - sw}):
            var = float(coarse[r0 // 4:(r0 + sh) // 4, c0 // 4:(c0 + sw) // 4].var())
            if var > best_var:
                best, best_var = (r0 + sh // 2, c0 + sw // 2), var
    return best


def _crop(level, centre, side):
    """The ``side`` x ``side`` part of ``level`` around ``centre`` (level px), inside it."""
    h, w = level.shape
    sh, sw = min(h, side), min(w, side)
    r0 = int(np.clip(centre[0] - sh // 2, 0, h - sh))
    c0 = int(np.clip(centre[1] - sw // 2, 0, w - sw))
    return level[r0:r0 + sh, c0:c0 + sw]


def _scale_scores(img, be):
    """Trial scales and the bright / dark scores of each (see :func:`estimate_sigma`)."""
    xp = be.xp
    scales = np.geomspace(0.7, min(img.shape) / 6.0, 24)
    # Level f (a power of 2) for a trial scale s: the largest with s / f >= 2 (the scale spans
    # >= 2 level px), capped near column widths (see _FREE_SCALE). Levels are 2 x 2 block
    # means of the previous one; all are cropped around the same busiest point.
    centre = _busiest_centre(img, SIGMA_REGION, xp)
    cap = 1 << max(0, int(np.log2(max(1, min(img.shape) // _LEVEL_REGION))))
    pyramid = {1: img}
    crops = {}
    bright, dark = [], []
    for s in scales:
        f = 1 << max(0, int(np.floor(np.log2(max(s / 2.0, 1.0)))))
        if s < _FREE_SCALE:
            f = min(f, cap)
        while f not in pyramid:
            g = max(pyramid)
            pyramid[2 * g] = _block_mean(pyramid[g], 2, xp)
        if f not in crops:
            side = SIGMA_REGION if f == 1 else _LEVEL_REGION
            crops[f] = _crop(pyramid[f], (centre[0] // f, centre[1] // f), side)
        # The f x f box adds f^2 / 12 px^2 of variance: removed from the trial scale.
        s_level = float(np.sqrt((s / f) ** 2 - (1.0 / 12.0 if f > 1 else 0.0)))
        resp = -((s / f) ** 2) * be.ndimage.gaussian_laplace(crops[f], s_level)
        bright.append(float(xp.percentile(resp, 99.5)))
        dark.append(float(xp.percentile(-resp, 99.5)))
    return scales, np.array(bright), np.array(dark)


def _contrast_scores(img, be):
    """(bright, dark): the strongest scale-normalised LoG response of peaks and of dips over
    the trial scales >= :data:`_CONTRAST_MIN_SCALE` px."""
    scales, bright, dark = _scale_scores(img, be)
    use = scales >= _CONTRAST_MIN_SCALE
    return float(bright[use].max()), float(dark[use].max())


def detect_contrast(image, *, backend=None, return_scores=False):
    """``"bright"`` when the image's columns are peaks (HAADF / ADF), ``"dark"`` when dips
    (ABF / BF).

    Columns are compact blobs; the background between them is not (broad maxima between
    dark columns, broad minima between bright ones). So the strongest scale-normalised LoG
    response of dips (the 99.5th percentile of ``s^2 LoG_s``, maximised over the trial
    scales of :func:`estimate_sigma` from 1 px up) is compared with that of peaks
    (``-s^2 LoG_s``): the larger names the contrast. Measured ratios (the larger score over
    the smaller): 3.3 on simulated SrTiO3 HAADF, 1.5-1.9 on simulated ABF (O visible) at
    200-2000 counts and noise-free, 1.6 on a real SrTiO3 ABF image.

    Parameters
    ----------
    image : (H, W) array or sidpy.Dataset
    backend : str, optional
    return_scores : bool
        Also return the two scores ``{"bright": ..., "dark": ...}``.

    Returns
    -------
    str or (str, dict)

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> from stemgpu.atoms.find import detect_contrast
    >>> haadf, _ = simulate_image((128, 128), seed=0)
    >>> abf, _ = simulate_image((128, 128), contrast="dark", background=4.0, seed=0)
    >>> detect_contrast(haadf), detect_contrast(abf)
    ('bright', 'dark')
    """
    cal = as_image(image, name="image", backend=backend)
    be = cal.backend
    bright, dark = _contrast_scores(cal.data.astype(be.xp.float32), be)
    choice = "dark" if dark > bright else "bright"
    return (choice, {"bright": bright, "dark": dark}) if return_scores else choice


def estimate_sigma(image, *, contrast="bright", backend=None) -> float:
    """Column width (px) maximising the scale-normalised LoG response of the brightest peaks
    (of the deepest dips with ``contrast="dark"``).

    The score of a trial scale ``s`` is the 99.5th percentile of ``-s^2 LoG_s(image)``; the
    24 trial scales run from 0.7 px to a sixth of the image side (geometric steps) and the best
    is refined by a parabola in log-scale. Each scale is computed on a 2^n block-mean level of
    the image where it spans 2-4 px (the box's 1/12 px^2 of variance removed from the trial
    scale), cropped to :data:`SIGMA_REGION` px (full resolution) or 256 level px around the
    busiest part of the image (columns, not vacuum), so the cost hardly grows with the image
    or the width: ~0.1 s at 1024 x 1024 on one CPU core (24 full-image passes took ~14 s at
    sigma 6 px).

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> from stemgpu.atoms.find import estimate_sigma
    >>> img, truth = simulate_image((96, 96), dose=None, seed=0)
    >>> abs(estimate_sigma(img) - truth.probe_sigma_px) < 0.5
    True
    """
    cal = as_image(image, name="image", backend=backend)
    be = cal.backend
    check_choice(contrast, "contrast", CONTRASTS)
    scales, bright, dark = _scale_scores(cal.data.astype(be.xp.float32), be)
    scores = bright if contrast == "bright" else dark
    i = int(np.argmax(scores))
    if 0 < i < len(scales) - 1:  # parabolic refinement in log-scale
        y0, y1, y2 = scores[i - 1], scores[i], scores[i + 1]
        den = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        step = np.log(scales[1] / scales[0])
        return float(np.exp(np.log(scales[i]) + frac * step))
    return float(scales[i])


def _real(value) -> bool:
    """A real number (NumPy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def find_atoms(image, *, sigma=None, threshold=0.03, min_distance=None, contrast="bright",
               backend=None):
    """Sub-pixel candidate column positions from a band-passed image.

    The image is smoothed with ``G(sigma/2)`` and band-passed with a white top-hat of
    ``4 sigma`` (the image minus its grey opening: the local background under each column is
    removed, so faint columns beside bright ones stay maxima), local maxima within
    ``min_distance`` above ``threshold`` times the strongest response are kept, and each is
    refined to sub-pixel by a parabola through its 3 x 3 neighbourhood. Memory is a few
    image-sized arrays (linear in the image size); ``scipy.ndimage`` on the CPU and
    ``cupyx.scipy.ndimage`` on the GPU.

    Parameters
    ----------
    image : (H, W) array or sidpy.Dataset
    sigma : float, optional
        Column width in px; estimated with :func:`estimate_sigma` when omitted.
    threshold : float
        Minimum band-passed peak height as a fraction of the strongest (0 < threshold < 1).
    min_distance : int, optional
        Minimum separation of peaks in px; default ``max(2, round(sigma))``.
    contrast : {"bright", "dark", "auto"}
        ``"bright"``: columns are maxima (HAADF / ADF); ``"dark"``: minima (ABF / BF; the
        pipeline runs on the negated image); ``"auto"``: chosen by :func:`detect_contrast`.
        The contrast used is ``FoundAtoms.contrast`` (and ``parameters["contrast"]``, with
        ``parameters["contrast_scores"]`` for ``"auto"``); :func:`stemgpu.fit_atoms` given
        the FoundAtoms fits that contrast.
    backend : str, optional

    Returns
    -------
    FoundAtoms
        ``positions`` (N, 2) and ``intensities`` (N,), brightest first.

    Raises
    ------
    ValueError
        A non-positive ``sigma``, ``threshold`` outside (0, 1), ``min_distance`` < 1, an
        unknown ``contrast``.

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> from stemgpu.atoms.find import find_atoms
    >>> img, truth = simulate_image((96, 96), lattice="square", seed=0)
    >>> found = find_atoms(img, sigma=truth.probe_sigma_px)
    >>> found.positions.shape[1]
    2
    >>> abf, _ = simulate_image((96, 96), lattice="square", contrast="dark", background=4.0,
    ...                         seed=0)
    >>> find_atoms(abf, sigma=truth.probe_sigma_px, contrast="auto").contrast
    'dark'
    """
    cal = as_image(image, name="image", backend=backend)
    be, xp = cal.backend, cal.backend.xp
    img = cal.data.astype(xp.float32)
    check_choice(contrast, "contrast", (*CONTRASTS, "auto"))
    chosen, scores = "given", None
    if contrast == "auto":
        contrast, scores = detect_contrast(img, backend=be, return_scores=True)
        chosen = "auto"
    if contrast == "dark":
        img = -img  # minima become maxima; the band-pass removes the offset
    estimated = sigma is None
    if estimated:
        sigma = estimate_sigma(img, backend=be)
    elif not _real(sigma):
        fail("sigma", "a positive number of pixels", sigma)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of pixels; got {sigma!r}")
    # The filters span ~4 sigma: a column wider than a quarter of the image side leaves no
    # column to find, and the filter cost grows with sigma squared.
    side = min(img.shape)
    if not estimated and sigma > side / 4.0:
        fail("sigma", f"a positive number of pixels <= {side / 4.0:g} (a quarter of the "
             "smaller image side)", sigma)
    if not (_real(threshold) and 0 < threshold < 1):
        raise ValueError(f"threshold must be a fraction in (0, 1); got {threshold!r}")
    if min_distance is None:
        min_distance = max(2, int(round(sigma)))
    if not (isinstance(min_distance, int | np.integer) and min_distance >= 1):
        raise ValueError(f"min_distance must be an integer >= 1 (px); got {min_distance!r}")
    # Peaks further apart than the image is large are one peak: larger values only cost
    # memory in the maximum filter.
    if min_distance > max(img.shape):
        fail("min_distance", f"an integer >= 1 and <= {max(img.shape)} (the image size, px)",
             min_distance)
    nd = be.ndimage
    # Light smoothing then a white top-hat (image minus its grey opening): the local
    # background under faint columns between bright ones is removed, which a wide
    # difference of Gaussians cannot do (its negative lobes swallow O beside Sr).
    smooth = nd.gaussian_filter(img, 0.5 * float(sigma))
    band = nd.white_tophat(smooth, size=2 * int(np.ceil(2.0 * sigma)) + 1)
    peak = nd.maximum_filter(band, size=2 * int(min_distance) + 1, mode="nearest")
    top = band.max()
    mask = (band == peak) & (band > threshold * top)
    mask[0, :] = False
    mask[-1, :] = False
    mask[:, 0] = False
    mask[:, -1] = False
    r, c = xp.nonzero(mask)
    v0 = band[r, c]

    def offset(vm, vp):
        den = vm - 2.0 * v0 + vp
        return xp.where(den < 0, 0.5 * (vm - vp) / xp.where(den < 0, den, -1.0), 0.0)

    dr = offset(band[r - 1, c], band[r + 1, c])
    dc = offset(band[r, c - 1], band[r, c + 1])
    pos = xp.stack([r + xp.clip(dr, -0.5, 0.5), c + xp.clip(dc, -0.5, 0.5)], axis=1)
    order = xp.argsort(-v0)
    return FoundAtoms(
        positions=pos[order].astype(xp.float64),
        intensities=v0[order],
        parameters={"sigma": float(sigma), "sigma_estimated": estimated,
                    "threshold": float(threshold), "min_distance": int(min_distance),
                    "contrast": contrast, "contrast_chosen": chosen,
                    "contrast_scores": scores, "backend": be.name},
        sigma=float(sigma),
        contrast=contrast,
    )


