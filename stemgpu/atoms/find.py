"""Candidate atom-column positions: band-pass filter, local maxima, sub-pixel refinement."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._inputs import as_image
from ..backend import to_host

__all__ = ["FoundAtoms", "estimate_sigma", "find_atoms"]


@dataclass(frozen=True)
class FoundAtoms:
    """Candidate columns: ``positions`` (N, 2) sub-pixel (row, col) and band-passed peak
    ``intensities`` (N,), brightest first. Unpacks as ``positions, intensities``."""

    positions: Any
    intensities: Any
    parameters: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.positions, self.intensities))

    def to_numpy(self) -> FoundAtoms:
        out = {}
        for f in ("positions", "intensities"):
            v = getattr(self, f)
            out[f] = to_host(v, copy=True)
        return replace(self, **out)


def estimate_sigma(image, *, backend=None) -> float:
    """Column width (px) maximising the scale-normalised LoG response of the brightest peaks.

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
    img = cal.data.astype(be.xp.float32)
    scales = np.geomspace(0.7, min(img.shape) / 6.0, 24)
    scores = []
    for s in scales:
        resp = -(s * s) * be.ndimage.gaussian_laplace(img, float(s))
        scores.append(float(be.xp.percentile(resp, 99.5)))
    i = int(np.argmax(scores))
    if 0 < i < len(scales) - 1:  # parabolic refinement in log-scale
        y0, y1, y2 = scores[i - 1], scores[i], scores[i + 1]
        den = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        step = np.log(scales[1] / scales[0])
        return float(np.exp(np.log(scales[i]) + frac * step))
    return float(scales[i])


def find_atoms(image, *, sigma=None, threshold=0.03, min_distance=None, backend=None):
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
    backend : str, optional

    Returns
    -------
    FoundAtoms
        ``positions`` (N, 2) and ``intensities`` (N,), brightest first.

    Raises
    ------
    ValueError
        A non-positive ``sigma``, ``threshold`` outside (0, 1), ``min_distance`` < 1.

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> from stemgpu.atoms.find import find_atoms
    >>> img, truth = simulate_image((96, 96), lattice="square", seed=0)
    >>> found = find_atoms(img, sigma=truth.probe_sigma_px)
    >>> found.positions.shape[1]
    2
    """
    cal = as_image(image, name="image", backend=backend)
    be, xp = cal.backend, cal.backend.xp
    img = cal.data.astype(xp.float32)
    if sigma is None:
        sigma = estimate_sigma(img, backend=be)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of pixels; got {sigma!r}")
    if not (0 < threshold < 1):
        raise ValueError(f"threshold must be a fraction in (0, 1); got {threshold!r}")
    if min_distance is None:
        min_distance = max(2, int(round(sigma)))
    if not (isinstance(min_distance, int | np.integer) and min_distance >= 1):
        raise ValueError(f"min_distance must be an integer >= 1 (px); got {min_distance!r}")
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
        parameters={"sigma": float(sigma), "threshold": float(threshold),
                    "min_distance": int(min_distance), "backend": be.name},
    )


