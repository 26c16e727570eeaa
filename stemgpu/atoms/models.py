"""The one registry of atom-column models, shared by the array LM and the CUDA kernel.

Every model is a peak plus a constant background, evaluated at pixel *centres* (integer
coordinates, the same sampling as :mod:`stemgpu.synthetic`). Each model has two parameter
vectors:

natural
    What users see, in this order (``Model.param_names``); positions are image coordinates
    (row, col) in px; amplitude and background are in the data's units.
internal
    What Levenberg-Marquardt iterates on (``Model.internal_names``): positions relative to the
    window's ``[0, 0]`` pixel (keeps float precision in large images), ``log`` of amplitude and
    widths (positivity by reparametrisation), amplitude and background in *counts*
    (data * gain). The map is elementwise:

    ============  =====================  ============================  ====================
    natural       internal               natural from internal         d natural / d internal
    ============  =====================  ============================  ====================
    amplitude     log(amplitude * gain)  exp(t) / gain                 exp(t) / gain
    row, col      row - origin_row ...   t + origin                    1
    sigma*        log(sigma)             exp(t)                        exp(t)
    angle         angle (rad)            t                             1
    background    background * gain      t / gain                      1 / gain
    ============  =====================  ============================  ====================

Models
------
``"gaussian"`` (P=5): amplitude, row, col, sigma, background ::

    mu(y, x) = A exp(-((y - r)^2 + (x - c)^2) / (2 s^2)) + B

``"elliptical"`` (P=7): amplitude, row, col, sigma_1, sigma_2, angle, background, with
``u = cos(t)(y - r) + sin(t)(x - c)``, ``v = -sin(t)(y - r) + cos(t)(x - c)`` ::

    mu(y, x) = A exp(-(u^2 / s1^2 + v^2 / s2^2) / 2) + B

so ``sigma_1`` is the width along the direction at ``angle`` from the +row axis towards +col.

Dark contrast (ABF / BF)
------------------------
Columns imaged as dips on a bright background use the same models with the peak subtracted:
``mu = B - A G`` (``A >= 0`` the dip depth, in the same ``log(amplitude * gain)`` internal
form). :func:`with_contrast` gives that variant of a registered model (``Model.sign`` -1, name
``"<name>_dark"``, also accepted by :func:`get_model`); its Jacobian is the bright one with
every column but the background's negated. The Poisson deviance needs ``mu > 0``: a trial
step whose dip reaches below zero is invalid (rejected) like any other invalid step.

Jacobians are analytic, with respect to the *internal* vector (see :func:`gaussian_jacobian`
and :func:`elliptical_jacobian` for the formulas).

Status codes (per fit, ``int8``) are module constants here so the kernel and the array code
agree; :data:`STATUS_NAMES` maps them to words.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._checks import check_choice

__all__ = [
    "CONVERGED",
    "DIVERGED",
    "ESTIMATORS",
    "FLAT",
    "INVALID_INPUT",
    "MAX_ITER",
    "MODELS",
    "OUT_OF_BOUNDS",
    "SINGULAR",
    "STATUS_NAMES",
    "Model",
    "CONTRASTS",
    "DARK_MODELS",
    "check_estimator",
    "get_model",
    "window_grid",
    "with_contrast",
]

#: Objectives every fitting engine implements (see :mod:`stemgpu.atoms.lm`): Poisson
#: maximum likelihood (deviance) and Poisson-weighted least squares. The CUDA kernel's
#: template codes are these names' positions (:data:`stemgpu.atoms.cuda.ESTIMATOR_CODES`).
ESTIMATORS = ("mle", "lsq")


def check_estimator(estimator):
    """``estimator`` if it is one of :data:`ESTIMATORS`, else a ``ValueError``.

    Examples
    --------
    >>> from stemgpu.atoms.models import check_estimator
    >>> check_estimator("lsq")
    'lsq'
    """
    return check_choice(estimator, "estimator", ESTIMATORS)

#: The fit met the convergence test (see :mod:`stemgpu.atoms.lm`).
CONVERGED = 0
#: ``max_iter`` iterations ran without meeting the convergence test.
MAX_ITER = 1
#: The damped normal matrix or the final Fisher information could not be factorised.
SINGULAR = 2
#: The position is outside the image, its window does not fit inside the image, or the fitted
#: centre left the window.
OUT_OF_BOUNDS = 3
#: The fit ran away: non-finite objective, a width at its bound, or the amplitude collapsed.
DIVERGED = 4
#: The window is flat (max == min): nothing to fit.
FLAT = 5
#: NaN / infinite input position.
INVALID_INPUT = 6

STATUS_NAMES = {
    CONVERGED: "converged",
    MAX_ITER: "max_iter",
    SINGULAR: "singular",
    OUT_OF_BOUNDS: "out_of_bounds",
    DIVERGED: "diverged",
    FLAT: "flat",
    INVALID_INPUT: "invalid_input",
}

#: Bounds on internal parameters (trial steps outside are rejected by LM).
SIGMA_MIN = 0.25  # px; narrower than a quarter pixel is not resolvable
AMPLITUDE_MIN_COUNTS = 1e-3  # counts


def _gauss_value(t, yy, xx, xp):
    """mu for internal params t (m, 5) at coordinates yy, xx (n,) -> (m, n)."""
    a = xp.exp(t[:, 0:1])
    dy = yy[None, :] - t[:, 1:2]
    dx = xx[None, :] - t[:, 2:3]
    inv_s2 = xp.exp(-2.0 * t[:, 3:4])
    g = xp.exp(-0.5 * (dy * dy + dx * dx) * inv_s2)
    return a * g + t[:, 4:5]


def gaussian_jacobian(t, yy, xx, xp):
    """Value (m, n) and Jacobian (m, n, 5) of the isotropic model w.r.t. internal params.

    With ``q = ((y-r)^2 + (x-c)^2) / s^2`` and ``G = A exp(-q/2)``:
    d/dlogA = G, d/dr = G (y-r)/s^2, d/dc = G (x-c)/s^2, d/dlogs = G q, d/dB = 1.
    """
    a = xp.exp(t[:, 0:1])
    dy = yy[None, :] - t[:, 1:2]
    dx = xx[None, :] - t[:, 2:3]
    inv_s2 = xp.exp(-2.0 * t[:, 3:4])
    q = (dy * dy + dx * dx) * inv_s2
    g = a * xp.exp(-0.5 * q)
    # Built as (m, P, n) (contiguous per parameter) and returned as its (m, n, P) view.
    jac = xp.stack(
        [g, g * dy * inv_s2, g * dx * inv_s2, g * q, xp.ones_like(g)], axis=1
    )
    return g + t[:, 4:5], jac.transpose(0, 2, 1)


def _gauss_grid_parts(t, k, xp):
    """Separable factors of the isotropic peak on the k x k grid: k + k exponentials per fit
    instead of k^2 (the peak is exp(row part) * exp(col part))."""
    d = xp.arange(k, dtype=xp.float64)
    inv_s2 = xp.exp(-2.0 * t[:, 3:4])
    dy = d[None, :] - t[:, 1:2]  # (m, k)
    dx = d[None, :] - t[:, 2:3]
    ey = xp.exp(-0.5 * dy * dy * inv_s2)
    ex = xp.exp(-0.5 * dx * dx * inv_s2)
    a = xp.exp(t[:, 0])[:, None, None]
    g = (a * ey[:, :, None]) * ex[:, None, :]  # (m, k, k)
    return g, dy, dx, inv_s2


def _gauss_grid_value(t, k, xp):
    """Isotropic model (m, k*k) on the row-major k x k grid (same values as _gauss_value)."""
    g = _gauss_grid_parts(t, k, xp)[0]
    return g.reshape(t.shape[0], -1) + t[:, 4:5]


def _gauss_grid_jacobian(t, k, xp):
    """Value (m, k*k) and Jacobian (m, k*k, 5) on the k x k grid (see gaussian_jacobian)."""
    g, dy, dx, inv_s2 = _gauss_grid_parts(t, k, xp)
    m = t.shape[0]
    jac = xp.empty((m, 5, k, k))
    jac[:, 0] = g
    jac[:, 1] = g * (dy * inv_s2)[:, :, None]
    jac[:, 2] = g * (dx * inv_s2)[:, None, :]
    jac[:, 3] = g * ((dy * dy * inv_s2)[:, :, None] + (dx * dx * inv_s2)[:, None, :])
    jac[:, 4] = 1.0
    jac = jac.reshape(m, 5, k * k)
    return g.reshape(m, -1) + t[:, 4:5], jac.transpose(0, 2, 1)


def _ell_parts(t, yy, xx, xp):
    a = xp.exp(t[:, 0:1])
    dy = yy[None, :] - t[:, 1:2]
    dx = xx[None, :] - t[:, 2:3]
    i1 = xp.exp(-2.0 * t[:, 3:4])
    i2 = xp.exp(-2.0 * t[:, 4:5])
    ct, st = xp.cos(t[:, 5:6]), xp.sin(t[:, 5:6])
    u = ct * dy + st * dx
    v = -st * dy + ct * dx
    g = a * xp.exp(-0.5 * (u * u * i1 + v * v * i2))
    return g, u, v, i1, i2, ct, st


def _ell_value(t, yy, xx, xp):
    g = _ell_parts(t, yy, xx, xp)[0]
    return g + t[:, 6:7]


def elliptical_jacobian(t, yy, xx, xp):
    """Value (m, n) and Jacobian (m, n, 7) of the elliptical model w.r.t. internal params.

    With ``G = A exp(-(u^2/s1^2 + v^2/s2^2)/2)``: d/dlogA = G,
    d/dr = G (u cos/s1^2 - v sin/s2^2), d/dc = G (u sin/s1^2 + v cos/s2^2),
    d/dlogs1 = G u^2/s1^2, d/dlogs2 = G v^2/s2^2, d/dangle = -G u v (1/s1^2 - 1/s2^2),
    d/dB = 1. With s1 == s2 the angle column is exactly zero (angle unidentifiable).
    """
    g, u, v, i1, i2, ct, st = _ell_parts(t, yy, xx, xp)
    jac = xp.stack(
        [
            g,
            g * (u * ct * i1 - v * st * i2),
            g * (u * st * i1 + v * ct * i2),
            g * u * u * i1,
            g * v * v * i2,
            -g * u * v * (i1 - i2),
            xp.ones_like(g),
        ],
        axis=1,
    )
    return g + t[:, 6:7], jac.transpose(0, 2, 1)


def window_grid(k, xp):
    """Flattened row-major float64 coordinates ``(yy, xx)`` (each ``(k*k,)``) of a k x k
    window: the pixel grid every model is evaluated on.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.models import window_grid
    >>> yy, xx = window_grid(2, np)
    >>> yy.tolist(), xx.tolist()
    ([0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0])
    """
    d = xp.arange(k, dtype=xp.float64)
    yy, xx = xp.meshgrid(d, d, indexing="ij")
    return yy.ravel(), xx.ravel()


@dataclass(frozen=True)
class Model:
    """One registered model (see the module docstring for formulas and reparametrisation).

    Attributes
    ----------
    name : str
    param_names : tuple of str
        Natural parameter order (columns of ``AtomFit.params``).
    internal_names : tuple of str
        Internal (LM) parameter order, same length and positions as ``param_names``.
    log_params : tuple of int
        Indices whose internal value is ``log`` of the natural value.
    counts_params : tuple of int
        Indices scaled by the gain (amplitude, background).
    position : tuple of int
        Indices of (row, col).
    widths : tuple of int
        Indices of the widths.
    angle : int or None
        Index of the rotation angle.
    amplitude, background : int
        Indices of the amplitude and the background.
    cuda_struct : str
        C++ struct of the model in ``kernels/model_<name>.cuh``: the CUDA kernel's template
        argument and an entry of the host build's model list (empty for dark variants, which
        have no kernel).
    sign : int
        +1: a peak above the background (``mu = B + A G``, bright contrast); -1: a dip below
        it (``mu = B - A G``, dark contrast, see :func:`with_contrast`).
    """

    name: str
    param_names: tuple[str, ...]
    internal_names: tuple[str, ...]
    log_params: tuple[int, ...]
    counts_params: tuple[int, ...]
    position: tuple[int, int]
    widths: tuple[int, ...]
    angle: int | None
    amplitude: int
    background: int
    cuda_struct: str
    _value: Any
    _value_and_jacobian: Any
    _grid_value: Any = None
    _grid_value_and_jacobian: Any = None
    sign: int = 1

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    @property
    def contrast(self) -> str:
        """``"bright"`` (peaks, ``sign`` +1) or ``"dark"`` (dips, ``sign`` -1)."""
        return "bright" if self.sign > 0 else "dark"

    def _signed(self, internal, mu):
        """``B - (mu - B)`` for a dark model (mu computed as the bright peak plus B)."""
        if self.sign > 0:
            return mu
        b = internal[:, self.background:self.background + 1]
        return 2.0 * b - mu

    def _signed_jacobian(self, jac, xp):
        """The peak's columns negated for a dark model (the background's stays +1)."""
        if self.sign > 0:
            return jac
        s = -xp.ones(self.n_params)
        s[self.background] = 1.0
        return jac * s

    def value(self, internal, yy, xx, xp):
        """Model (m, n) at pixel coordinates ``yy, xx`` (n,) relative to the window origin."""
        return self._signed(internal, self._value(internal, yy, xx, xp))

    def value_and_jacobian(self, internal, yy, xx, xp):
        """Model (m, n) and its Jacobian (m, n, P) with respect to the internal parameters."""
        mu, jac = self._value_and_jacobian(internal, yy, xx, xp)
        return self._signed(internal, mu), self._signed_jacobian(jac, xp)

    def value_on_grid(self, internal, k, xp):
        """Model (m, k*k) on the row-major k x k window grid (a faster path where the model
        is separable; the values equal :meth:`value` on that grid)."""
        if self._grid_value is not None:
            return self._signed(internal, self._grid_value(internal, k, xp))
        yy, xx = window_grid(k, xp)
        return self.value(internal, yy, xx, xp)

    def value_and_jacobian_on_grid(self, internal, k, xp):
        """Model (m, k*k) and Jacobian (m, k*k, P) on the row-major k x k window grid."""
        if self._grid_value_and_jacobian is not None:
            mu, jac = self._grid_value_and_jacobian(internal, k, xp)
            return self._signed(internal, mu), self._signed_jacobian(jac, xp)
        yy, xx = window_grid(k, xp)
        return self.value_and_jacobian(internal, yy, xx, xp)

    def to_internal(self, natural, origins, gain, xp):
        """Natural (m, P) -> internal (m, P), float64; origins (m, 2) of the windows."""
        t = xp.asarray(natural, dtype=xp.float64).copy()
        t[:, self.position[0]] -= origins[:, 0]
        t[:, self.position[1]] -= origins[:, 1]
        t[:, self.amplitude] *= gain
        t[:, self.background] *= gain
        for i in self.log_params:
            t[:, i] = xp.log(t[:, i])
        return t

    def to_natural(self, internal, origins, gain, xp):
        """Internal (m, P) -> natural (m, P)."""
        n = internal.copy()
        for i in self.log_params:
            n[:, i] = xp.exp(n[:, i])
        n[:, self.position[0]] += origins[:, 0]
        n[:, self.position[1]] += origins[:, 1]
        n[:, self.amplitude] /= gain
        n[:, self.background] /= gain
        return n

    def natural_derivative(self, internal, gain, xp):
        """Diagonal d natural / d internal (m, P), for propagating the covariance."""
        d = xp.ones_like(internal)
        for i in self.log_params:
            d[:, i] = xp.exp(internal[:, i])
        d[:, self.amplitude] /= gain
        d[:, self.background] /= gain
        return d


MODELS: dict[str, Model] = {
    "gaussian": Model(
        name="gaussian",
        param_names=("amplitude", "row", "col", "sigma", "background"),
        internal_names=("log_amplitude_counts", "row_local", "col_local", "log_sigma",
                        "background_counts"),
        log_params=(0, 3),
        counts_params=(0, 4),
        position=(1, 2),
        widths=(3,),
        angle=None,
        amplitude=0,
        background=4,
        cuda_struct="stemgpu::Gaussian",
        _value=_gauss_value,
        _value_and_jacobian=gaussian_jacobian,
        _grid_value=_gauss_grid_value,
        _grid_value_and_jacobian=_gauss_grid_jacobian,
    ),
    "elliptical": Model(
        name="elliptical",
        param_names=("amplitude", "row", "col", "sigma_1", "sigma_2", "angle", "background"),
        internal_names=("log_amplitude_counts", "row_local", "col_local", "log_sigma_1",
                        "log_sigma_2", "angle", "background_counts"),
        log_params=(0, 3, 4),
        counts_params=(0, 6),
        position=(1, 2),
        widths=(3, 4),
        angle=5,
        amplitude=0,
        background=6,
        cuda_struct="stemgpu::Elliptical",
        _value=_ell_value,
        _value_and_jacobian=elliptical_jacobian,
    ),
}


#: Image contrasts: columns brighter than the background (HAADF / ADF) or darker (ABF / BF).
CONTRASTS = ("bright", "dark")

#: The dark-contrast variants of the registered models (``mu = B - A G``), by name
#: ``"<name>_dark"``. Not in :data:`MODELS`: that list is the CUDA kernel's, and the kernel
#: and the compiled engine fit these through the array code.
DARK_MODELS: dict[str, Model] = {
    f"{name}_dark": replace(m, name=f"{name}_dark", cuda_struct="", sign=-1)
    for name, m in MODELS.items()
}


def with_contrast(model: str | Model, contrast: str) -> Model:
    """The variant of ``model`` for ``contrast`` (``"dark"``: dips, ``"bright"``: peaks).

    Examples
    --------
    >>> from stemgpu.atoms.models import with_contrast
    >>> m = with_contrast("gaussian", "dark")
    >>> m.name, m.sign, m.contrast
    ('gaussian_dark', -1, 'dark')
    >>> with_contrast(m, "bright").name
    'gaussian'
    """
    mdl = get_model(model)
    check_choice(contrast, "contrast", CONTRASTS)
    if mdl.contrast == contrast:
        return mdl
    base = mdl.name[: -len("_dark")] if mdl.sign < 0 else mdl.name
    if contrast == "bright":
        return MODELS[base] if base in MODELS else replace(mdl, name=base, sign=1)
    key = f"{base}_dark"
    return DARK_MODELS[key] if key in DARK_MODELS else replace(mdl, name=key, cuda_struct="",
                                                               sign=-1)


def get_model(model: str | Model) -> Model:
    """Look up a model by name, with an error listing the registered names.

    Examples
    --------
    >>> from stemgpu.atoms.models import get_model
    >>> get_model("gaussian").param_names
    ('amplitude', 'row', 'col', 'sigma', 'background')
    >>> get_model("gaussian_dark").sign
    -1
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, str) and model in DARK_MODELS:
        return DARK_MODELS[model]
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(
            f"model={model!r} is not a registered model; accepted: "
            + ", ".join(repr(m) for m in MODELS)
            + " (and their dark-contrast variants '<name>_dark')"
        )
    return MODELS[model]


def _self_check() -> float:  # pragma: no cover - developer aid
    """Max relative error of the analytic Jacobians against central differences."""
    rng = np.random.default_rng(0)
    yy, xx = window_grid(9, np)
    worst = 0.0
    for m in (*MODELS.values(), *DARK_MODELS.values()):
        t = np.array([[np.log(50.0), 4.2, 3.9, np.log(1.8), 0.4, 0.3, 5.0][: m.n_params]])
        if m.name.startswith("gaussian"):
            t = np.array([[np.log(50.0), 4.2, 3.9, np.log(1.8), 5.0]])
        t = t + rng.normal(scale=0.05, size=t.shape)
        _, jac = m.value_and_jacobian(t, yy, xx, np)
        for i in range(m.n_params):
            e = np.zeros_like(t)
            e[0, i] = 1e-6
            num = (m.value(t + e, yy, xx, np) - m.value(t - e, yy, xx, np)) / 2e-6
            worst = max(worst, float(np.abs(num - jac[..., i]).max() / np.abs(jac).max()))
    return worst
