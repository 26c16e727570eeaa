"""The scan-distortion matrix: estimate it on a reference dataset, correct another one.

Convention (the same as :mod:`stemgpu.synthetic`): a scan with distortion matrix ``A`` records
the sample point ``x`` at pixel ``q = A^-1 (x - o)``, i.e. ``x = A q + o``. Lattice vectors
measured in pixels are therefore ``m = A^-1 t`` for true lattice vectors ``t`` (in pixels of
an ideal scan), and

* :func:`estimate_distortion` returns ``A`` itself (the matrix passed as
  ``simulate_stack(distortion=A)``), fitted so that ``t = A m`` over all unit cells;
* :func:`correct_distortion` maps positions ``q -> A (q - c) + c`` and resamples images so
  that the corrected image at ``x`` shows the recorded image at ``A^-1 (x - c) + c``: a
  column recorded at ``q`` appears at ``A (q - c) + c`` (``c``: ``center``).

With only a lattice parameter (no orientation) the rotation part of ``A`` cannot be told apart
from a rotation of the specimen: then the symmetric (rotation-free) matrix ``S`` of the polar
decomposition ``A = Q S`` is returned (``kind="symmetric"``), which makes the cells square and
of the right size while leaving the orientation as recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_choice
from .._inputs import as_image, resolve_pixel_size
from ..backend import HostCopyMixin, resolve_backend, to_host
from .cells import UnitCells, unit_cells

__all__ = ["DistortionEstimate", "correct_distortion", "estimate_distortion"]


@dataclass(frozen=True)
class DistortionEstimate(HostCopyMixin):
    """Result of :func:`estimate_distortion`.

    Attributes
    ----------
    matrix : (2, 2) float64
        Scan-distortion matrix ``A`` (``x = A q``; :mod:`stemgpu.synthetic` convention).
    uncertainty : (2, 2) float64
        Standard error of each element (bootstrap over cells, fixed seed).
    kind : {"full", "symmetric"}
        ``"full"`` with known lattice vectors; ``"symmetric"`` (rotation-free part) with a
        lattice parameter only.
    n_cells : int
        Cells used.
    residual_rms_px : float
        RMS of ``t - A m`` over the cells' lattice vectors, px.
    reference : (2, 2) float64
        True lattice vectors (rows) the cells were fitted to, px.
    parameters : dict
    """

    matrix: Any
    uncertainty: Any
    kind: str
    n_cells: int
    residual_rms_px: float
    reference: Any
    parameters: dict = field(default_factory=dict)

    @property
    def inverse(self) -> np.ndarray:
        """``A^-1``: maps true positions to recorded pixels."""
        return np.linalg.inv(self.matrix)

    def __str__(self) -> str:
        a, u = self.matrix, self.uncertainty
        return (f"scan distortion ({self.kind}, {self.n_cells} cells, residual "
                f"{self.residual_rms_px:.3g} px):\n"
                f"  [[{a[0, 0]:.5f} +/- {u[0, 0]:.5f}, {a[0, 1]:.5f} +/- {u[0, 1]:.5f}],\n"
                f"   [{a[1, 0]:.5f} +/- {u[1, 0]:.5f}, {a[1, 1]:.5f} +/- {u[1, 1]:.5f}]]")


def _sym_sqrt_inv(g: np.ndarray) -> np.ndarray:
    """``g^(-1/2)`` of symmetric positive-definite (..., 2, 2) matrices."""
    w, v = np.linalg.eigh(g)
    return (v * (1.0 / np.sqrt(w))[..., None, :]) @ np.swapaxes(v, -1, -2)


def _bootstrap_weights(rng, n: int, size: int):
    """Poisson(1) bootstrap weights, yielded in chunks of at most ~10^7 numbers."""
    chunk = max(1, 10_000_000 // max(n, 1))
    for start in range(0, size, chunk):
        yield rng.poisson(1.0, size=(min(chunk, size - start), n)).astype(np.float64)


def estimate_distortion(positions, *, lattice, pixel_size: float | None = None,
                        species=None, a_site=None, n_bootstrap: int = 200, seed: int = 0,
                        angle_tolerance_deg: float = 12.0,
                        side_tolerance: float = 0.15) -> DistortionEstimate:
    """Fit the 2 x 2 scan-distortion matrix from a reference dataset of known lattice.

    Parameters
    ----------
    positions : (N, 2) array or UnitCells
        Column positions (row, col) px of the reference dataset (or its cells).
    lattice : float or (2, 2) array
        The known lattice: a lattice parameter in pm of a square lattice (needs
        ``pixel_size``; returns the symmetric, rotation-free ``A``), or the true lattice
        vectors (rows ``t1, t2``) in px of an ideal scan (returns the full ``A``).
    pixel_size : float, optional
        pm per pixel (of the ideal scan).
    species, a_site
        Passed to :func:`stemgpu.unit_cells` to pick the corner columns.
    n_bootstrap, seed
        Bootstrap over cells for the uncertainty of each element.
    angle_tolerance_deg, side_tolerance
        Cell acceptance tolerances of :func:`stemgpu.unit_cells`.

    Returns
    -------
    DistortionEstimate
        ``matrix`` is ``A`` in the convention of :mod:`stemgpu.synthetic`.

    Raises
    ------
    ValueError
        A lattice parameter without ``pixel_size``, a malformed ``lattice``, fewer than 3
        cells, or any error of :func:`stemgpu.unit_cells`.

    Notes
    -----
    Full fit: minimise ``sum_k sum_i |t_i - A m_ik|^2`` over the cells' vectors ``m_ik``:
    ``A = (sum t m^T)(sum m m^T)^-1``. Symmetric fit: for a square lattice of side ``a``,
    ``sum_i m_i m_i^T = a^2 A^-1 A^-T`` per cell, so ``S = a G^(-1/2)`` with ``G`` the cell
    mean of ``sum_i m_i m_i^T``.

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> A = np.array([[1.02, 0.01], [0.0, 0.99]])
    >>> r, c = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    >>> x = np.stack([r.ravel(), c.ravel()], 1) * 26.75
    >>> est = stemgpu.estimate_distortion(x @ np.linalg.inv(A).T, lattice=np.eye(2) * 26.75)
    >>> (np.round(est.matrix, 4) + 0.0).tolist()
    [[1.02, 0.01], [0.0, 0.99]]
    """
    px = resolve_pixel_size(pixel_size, None)
    arr = None if isinstance(lattice, str) or lattice is None else np.asarray(lattice, float)
    if arr is None or arr.shape not in ((), (2, 2)):
        raise ValueError(
            "lattice must be a lattice parameter in pm (with pixel_size=) or the true lattice "
            f"vectors as a (2, 2) array in px; got {lattice!r}"
        )
    if arr.shape == ():
        if px is None:
            raise ValueError(f"lattice={float(arr)!r} pm needs pixel_size= (pm per pixel) to "
                             "compare with positions in px")
        if not np.isfinite(arr) or arr <= 0:
            raise ValueError(f"lattice parameter must be a positive number of pm; got {lattice!r}")
        kind = "symmetric"
    else:
        if not np.all(np.isfinite(arr)) or abs(np.linalg.det(arr)) < 1e-9:
            raise ValueError(f"lattice vectors must be finite and non-singular; got {arr.tolist()}")
        kind = "full"
    if isinstance(positions, UnitCells):
        cells = positions.to_numpy()
        if kind == "full" and not np.allclose(cells.reference, arr):
            raise ValueError("cells were made with another lattice; pass the positions instead, "
                             "or unit_cells(..., lattice=<the same vectors>)")
    else:
        cells = unit_cells(positions, species=species, a_site=a_site,
                           lattice=arr if kind == "full" else float(arr), pixel_size=px,
                           angle_tolerance_deg=angle_tolerance_deg,
                           side_tolerance=side_tolerance)
    cells = cells.to_numpy()
    n = cells.n_cells
    if n < 3:
        raise ValueError(f"estimate_distortion needs at least 3 unit cells; found {n}")
    m = np.asarray(cells.vectors, dtype=np.float64)  # (n, 2, 2) rows m1, m2
    mm = np.einsum("kia,kib->kab", m, m).reshape(n, 4)  # sum_i m_i m_i^T per cell
    rng = np.random.default_rng(seed)
    if kind == "full":
        t = arr
        tm = np.einsum("ia,kib->kab", t, m).reshape(n, 4)  # sum_i t_i m_i^T per cell

        def solve(w_mm, w_tm):
            return w_tm.reshape(-1, 2, 2) @ np.linalg.inv(w_mm.reshape(-1, 2, 2))

        a_hat = solve(mm.sum(0), tm.sum(0))[0]
        boots = [solve(w @ mm, w @ tm) for w in _bootstrap_weights(rng, n, n_bootstrap)]
        reference = t
    else:
        side = float(arr) / px

        def solve(w_mm, w_sum):
            g = w_mm.reshape(-1, 2, 2) / np.reshape(w_sum, (-1, 1, 1))
            return side * _sym_sqrt_inv(g)

        a_hat = solve(mm.sum(0), n)[0]
        boots = [solve(w @ mm, w.sum(1)) for w in _bootstrap_weights(rng, n, n_bootstrap)]
        # The true vectors in the symmetric frame: t_i = S m_i of the median cell, squared.
        reference = side * np.eye(2)
    boot = np.concatenate(boots, axis=0)
    unc = boot.std(axis=0, ddof=1)
    pred = np.einsum("ab,kib->kia", a_hat, m)
    if kind == "full":
        resid = pred - reference[None]
    else:
        # Rotation is free: compare lengths and the right angle instead of components.
        lens = np.linalg.norm(pred, axis=2) - side
        cosang = np.einsum("ka,ka->k", pred[:, 0], pred[:, 1]) / side
        resid = np.concatenate([lens.ravel(), cosang])
    params = {"lattice": arr.tolist(), "pixel_size_pm": px, "n_bootstrap": int(n_bootstrap),
              "seed": int(seed), "cells": cells.parameters}
    return DistortionEstimate(a_hat, unc, kind, n, float(np.sqrt(np.mean(resid ** 2))),
                              np.asarray(reference, dtype=np.float64), params)


def correct_distortion(data, matrix, *, center=None, kind: str = "auto", order: int = 3,
                       mode: str = "nearest", cval: float = 0.0, backend=None):
    """Undo a scan distortion on positions (linear map) or images/stacks (resampling).

    Parameters
    ----------
    data : (N, 2) positions, (H, W) image or (F, H, W) stack
        NumPy or CuPy array (or a sidpy Dataset for images). A 2-D array with two columns
        is taken as positions unless ``kind="image"``.
    matrix : (2, 2) array or DistortionEstimate
        The scan-distortion matrix ``A`` (as returned by :func:`estimate_distortion`).
    center : (row, col), optional
        Fixed point of the correction; default the image centre ``((H-1)/2, (W-1)/2)`` for
        images and ``(0, 0)`` for positions. Pass the image centre for positions to get
        the positions of the corrected image.
    kind : {"auto", "positions", "image"}
    order : int
        Spline order of the resampling (images), 0-5.
    mode : str
        How points outside the recorded image are filled (``scipy.ndimage`` modes).
    cval : float
        Fill value for ``mode="constant"``.
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    array
        Corrected positions ``A (q - c) + c`` (float64) or the resampled image/stack
        (float32 unless float64 was given), on the input's backend. A stack is resampled with
        one batched ``affine_transform`` call.

    Raises
    ------
    ValueError
        Malformed or singular ``matrix``, bad ``kind``/``center``/``order``, non-finite data.

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> A = np.array([[1.0, 0.02], [0.0, 1.0]])
    >>> stemgpu.correct_distortion(np.array([[10.0, 0.0], [0.0, 10.0]]), A).tolist()
    [[10.0, 0.0], [0.2, 10.0]]
    >>> stemgpu.correct_distortion(np.ones((2, 8, 8), np.float32), A).shape
    (2, 8, 8)
    """
    a = matrix.matrix if isinstance(matrix, DistortionEstimate) else matrix
    a = np.asarray(to_host(a), dtype=np.float64)
    if a.shape != (2, 2) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a)) < 1e-9:
        raise ValueError(f"matrix must be a finite, non-singular 2 x 2 array; got {matrix!r}")
    check_choice(kind, "kind", ("auto", "positions", "image"))
    shape = getattr(data, "shape", None)
    is_pos = kind == "positions" or (
        kind == "auto" and shape is not None and len(shape) == 2 and shape[1] == 2)
    if is_pos:
        be = resolve_backend(backend, data)
        xp = be.xp
        q = be.asarray(data, dtype="float64")
        if q.ndim != 2 or q.shape[1] != 2:
            raise ValueError(f"positions must have shape (N, 2); got {tuple(q.shape)}")
        c = np.zeros(2) if center is None else np.asarray(center, dtype=np.float64)
        if c.shape != (2,):
            raise ValueError(f"center must be a (row, col) pair; got {center!r}")
        cx = xp.asarray(c)
        return (q - cx) @ xp.asarray(a.T) + cx
    if not isinstance(order, int | np.integer) or not 0 <= order <= 5:
        raise ValueError(f"order must be an integer 0-5; got {order!r}")
    cal = as_image(data, name="data", backend=backend, allow_stack=True)
    be, img = cal.backend, cal.data
    h, w = img.shape[-2:]
    c = np.array([(h - 1) / 2.0, (w - 1) / 2.0]) if center is None else np.asarray(
        center, dtype=np.float64)
    if c.shape != (2,):
        raise ValueError(f"center must be a (row, col) pair; got {center!r}")
    ainv = np.linalg.inv(a)
    offset = c - ainv @ c
    if img.ndim == 3:  # one batched call: identity along frames
        mat = np.eye(3)
        mat[1:, 1:] = ainv
        off = np.concatenate([[0.0], offset])
    else:
        mat, off = ainv, offset
    return be.ndimage.affine_transform(img, be.asarray(mat), offset=tuple(off.tolist()),
                                       order=order, mode=mode, cval=cval,
                                       output=img.dtype)
