"""Deformation gradient, strain, rotation, tetragonal and shear distortion, B-site displacement.

All functions are vectorised over cells (NumPy, float64: strains of 1e-4 are differences of
lengths of ~27 px, so float32 would eat most of the digits).

Conventions
-----------
A cell is described by the matrix ``M`` whose rows are its lattice vectors ``a1, a2`` as
``(row, col)`` components in px; the reference cell likewise by ``R`` (rows ``r1, r2``).
The deformation gradient ``F`` maps reference vectors onto the cell's vectors as column
vectors,

.. math:: a_i = F\\, r_i, \\qquad F = M^T R^{-T}.

``F`` is split by the polar decomposition ``F = Q(\\theta)\\, U`` into a rotation by
``theta`` (positive turns the row axis towards the col axis, i.e. counter-clockwise on a
screen with rows pointing down) and the symmetric right stretch ``U``. The strain is the Biot
strain ``epsilon = U - I``: it is independent of the rotation (exact for any rotation
angle) and equals the small-strain tensor ``(F + F^T)/2 - I`` to first order.
``epsilon`` is returned in image axes (row, col) and in the *lattice frame*: axis 1 along
``r1``, axis 2 perpendicular to it on the side of ``r2``.

From the lattice-frame strain,

* tetragonal distortion  ``t = epsilon_11 - epsilon_22``  (relative length difference of the
  two cell sides, measured against the reference; positive when the cell is longer along
  ``a1``);
* shear distortion  ``s = epsilon_12``  (tensor shear; for a square reference the angle
  between ``a1`` and ``a2`` is ``90 deg - 2 s`` in radians to first order).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bsite_displacement",
    "deformation_gradient",
    "lattice_frame",
    "polar_decomposition",
    "strain_components",
]


def deformation_gradient(vectors, reference) -> np.ndarray:
    """Per-cell deformation gradient ``F = M^T R^{-T}`` (so that ``a_i = F r_i``).

    Parameters
    ----------
    vectors : (n, 2, 2) array
        Rows ``a1, a2`` of every cell, px.
    reference : (2, 2) array
        Rows ``r1, r2`` of the reference cell, px.

    Returns
    -------
    F : (n, 2, 2) float64

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.strain import deformation_gradient
    >>> ref = np.eye(2) * 10
    >>> cell = np.array([[[10.1, 0.0], [0.0, 10.0]]])
    >>> np.round(deformation_gradient(cell, ref)[0], 3).tolist()
    [[1.01, 0.0], [0.0, 1.0]]
    """
    m = np.asarray(vectors, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return np.swapaxes(m, -1, -2) @ np.linalg.inv(r).T


def polar_decomposition(F):
    """Closed-form 2-D polar decomposition ``F = Q(theta) U``.

    Returns
    -------
    theta : (n,) float64
        Rotation angle in radians (positive turns the row axis towards the col axis).
    U : (n, 2, 2) float64
        Symmetric right stretch tensor.

    Notes
    -----
    For a 2 x 2 ``F`` with positive determinant, ``theta = atan2(F10 - F01, F00 + F11)`` and
    ``U = Q(theta)^T F`` is symmetric (this is the rotation closest to ``F``).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.strain import polar_decomposition
    >>> c, s = np.cos(0.1), np.sin(0.1)
    >>> theta, U = polar_decomposition(np.array([[[c, -s], [s, c]]]) * 1.01)
    >>> round(float(theta[0]), 6), (np.round(U[0], 6) + 0.0).tolist()
    (0.1, [[1.01, 0.0], [0.0, 1.01]])
    """
    F = np.asarray(F, dtype=np.float64)
    theta = np.arctan2(F[..., 1, 0] - F[..., 0, 1], F[..., 0, 0] + F[..., 1, 1])
    c, s = np.cos(theta), np.sin(theta)
    qt = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)  # Q(theta)^T
    U = qt @ F
    U = 0.5 * (U + np.swapaxes(U, -1, -2))  # symmetric up to rounding; make it exact
    return theta, U


def lattice_frame(reference) -> np.ndarray:
    """Orthonormal frame ``P`` (columns e1, e2): e1 along ``r1``, e2 perpendicular on ``r2``'s side.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.strain import lattice_frame
    >>> lattice_frame(np.array([[0.0, 5.0], [-5.0, 0.0]])).tolist()
    [[0.0, -1.0], [1.0, 0.0]]
    """
    r = np.asarray(reference, dtype=np.float64)
    e1 = r[0] / np.linalg.norm(r[0])
    e2 = np.array([-e1[1], e1[0]])
    if np.dot(e2, r[1]) < 0:
        e2 = -e2
    return np.stack([e1, e2], axis=1)


def strain_components(vectors, reference) -> dict:
    """Strain, rotation, tetragonal and shear distortion of every cell against ``reference``.

    Parameters
    ----------
    vectors : (n, 2, 2) array
        Rows ``a1, a2`` of every cell, px.
    reference : (2, 2) array
        Rows ``r1, r2`` of the reference cell, px.

    Returns
    -------
    dict with
        ``F`` (n, 2, 2) deformation gradient ``F = M^T R^{-T}``;
        ``strain`` (n, 2, 2) Biot strain ``U - I`` in image axes (row, col);
        ``strain_lattice`` (n, 2, 2) the same in the lattice frame ``P^T (U - I) P``;
        ``rotation_deg`` (n,) rotation of the cell against the reference, degrees;
        ``tetragonal`` (n,) ``epsilon_11 - epsilon_22`` (lattice frame);
        ``shear`` (n,) ``epsilon_12`` (lattice frame).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.strain import strain_components
    >>> ref = np.eye(2) * 20.0
    >>> cells = np.array([[[20.2, 0.0], [0.0, 20.0]]])      # 1 % longer along a1
    >>> out = strain_components(cells, ref)
    >>> round(float(out["tetragonal"][0]), 6), round(float(out["shear"][0]), 6)
    (0.01, 0.0)
    """
    F = deformation_gradient(vectors, reference)
    theta, U = polar_decomposition(F)
    eps = U - np.eye(2)
    P = lattice_frame(reference)
    eps_l = P.T @ eps @ P
    return {
        "F": F,
        "strain": eps,
        "strain_lattice": eps_l,
        "rotation_deg": np.degrees(theta),
        "tetragonal": eps_l[..., 0, 0] - eps_l[..., 1, 1],
        "shear": eps_l[..., 0, 1],
    }


def bsite_displacement(centres, bsite_positions, *, max_distance: float):
    """Displacement of the B-site column nearest to each cell centre (KD-tree, vectorised).

    Parameters
    ----------
    centres : (n, 2) array
        Cell centres (mean of the four A-site corners), px.
    bsite_positions : (m, 2) array
        B-site column positions, px.
    max_distance : float
        A B-site column farther than this from the centre is not assigned to the cell, px.

    Returns
    -------
    index : (n,) int64
        Row of ``bsite_positions`` assigned to each cell, -1 where none.
    displacement : (n, 2) float64
        ``b - centre`` (row, col) px; NaN where ``index == -1``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.strain import bsite_displacement
    >>> idx, d = bsite_displacement(np.array([[5.0, 5.0], [50.0, 50.0]]),
    ...                             np.array([[5.2, 4.9]]), max_distance=2.0)
    >>> idx.tolist(), np.round(d[0], 3).tolist(), bool(np.isnan(d[1]).all())
    ([0, -1], [0.2, -0.1], True)
    """
    from scipy.spatial import cKDTree

    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(bsite_positions, dtype=np.float64).reshape(-1, 2)
    index = np.full(len(centres), -1, dtype=np.int64)
    disp = np.full((len(centres), 2), np.nan)
    if len(b) == 0 or len(centres) == 0:
        return index, disp
    dist, idx = cKDTree(b).query(centres, k=1, distance_upper_bound=float(max_distance))
    ok = np.isfinite(dist)
    index[ok] = idx[ok]
    disp[ok] = b[idx[ok]] - centres[ok]
    return index, disp
