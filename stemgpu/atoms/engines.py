"""Fitting engines: the one object every pass of :func:`stemgpu.fit_atoms` fits through.

An engine runs the batched Levenberg-Marquardt specified in :mod:`stemgpu.atoms.lm` on a set
of windows and returns its :class:`~stemgpu.atoms.lm.LMOutput`. It is built once per call of
``fit_atoms`` with the options every pass shares (the data, estimator, iteration limit,
tolerance); the passes (plain fit, neighbour refits, held-width refits, elliptical fit) then
only say *what* to fit.

============  =================================================  =========================
engine        implementation                                     backends
============  =================================================  =========================
``array``     :func:`stemgpu.atoms.lm.lm_fit` (NumPy / CuPy)      numpy, cupy
``kernel``    :func:`stemgpu.atoms.cuda.lm_fit_kernel` (fused)   cupy
============  =================================================  =========================

``engine="auto"`` (the default of ``fit_atoms``) is the kernel on CuPy, the array code
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_choice
from .lm import LMOutput, lm_fit
from .models import Model

__all__ = ["ENGINES", "ArrayEngine", "FitEngine", "KernelEngine", "make_engine"]

#: Values of ``fit_atoms(engine=...)``.
ENGINES = ("auto", "array", "kernel")


@dataclass(frozen=True)
class FitEngine:
    """Interface of a fitting engine (subclasses implement :meth:`fit`).

    Attributes
    ----------
    stack : (F, H, W) array
        The data on the backend (engines that read windows in place use it).
    xp : module
        Array namespace of ``stack`` (numpy or cupy).
    estimator : {"mle", "lsq"}
    max_iter : int
    tol : float
        As in :func:`stemgpu.atoms.lm.lm_fit`.
    name : str (class attribute)
        What ``AtomFit.parameters["engine"]`` records.

    Notes
    -----
    Adding an engine is one small class. A CPU-compiled engine whose ``lm_fit`` has the
    signature of :func:`stemgpu.atoms.lm.lm_fit` (e.g. ``stemgpu/atoms/_compiled.py``) is an
    :class:`ArrayEngine` with another solver::

        class CompiledEngine(ArrayEngine):
            name = "compiled"

            @staticmethod
            def solver(*args, **kwargs):
                from ._compiled import lm_fit

                return lm_fit(*args, **kwargs)

    plus its name in :data:`ENGINES` and its choice rule in :func:`make_engine`. An engine
    with its own calling convention overrides :meth:`fit` instead (see
    :class:`KernelEngine`).
    """

    stack: Any
    xp: Any
    estimator: str = "mle"
    max_iter: int = 50
    tol: float = 1e-7
    name: ClassVar[str] = ""

    def fit(self, windows, origins, init, *, model: Model, gain=1.0, offset=None, fixed=None,
            frame_index=None) -> LMOutput:
        """Fit ``model`` to every window.

        Parameters
        ----------
        windows : (M, k, k) array
            The windows, gathered from ``stack`` at ``frame_index`` and ``origins``.
        origins : (M, 2) array
            Image (row, col) of each window's ``[0, 0]`` pixel (integer-valued).
        init : (M, P) array
            Natural initial parameters.
        model : Model
        gain : float
            Counts per data unit.
        offset : (M, k, k) array, optional
            Known additive model part in data units (fitted neighbouring columns).
        fixed : (M, P) bool array, optional
            Parameters held at their initial value.
        frame_index : (M,) int array, optional
            Frame of each window in ``stack`` (for engines that read the stack in place).

        Returns
        -------
        LMOutput
        """
        raise NotImplementedError


@dataclass(frozen=True)
class ArrayEngine(FitEngine):
    """The array LM of :mod:`stemgpu.atoms.lm` on NumPy or CuPy (fits the given windows).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.engines import ArrayEngine
    >>> from stemgpu.atoms.models import get_model
    >>> yy, xx = np.mgrid[0:11, 0:11]
    >>> win = (100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10)[None]
    >>> engine = ArrayEngine(stack=win, xp=np)
    >>> out = engine.fit(win, np.zeros((1, 2)), np.array([[90.0, 5, 5, 1.8, 8]]),
    ...                  model=get_model("gaussian"))
    >>> np.round(out.params[0, 1:3], 3).tolist(), int(out.status[0])
    ([5.3, 4.8], 0)
    """

    name: ClassVar[str] = "array"
    solver: ClassVar[Any] = staticmethod(lm_fit)

    def fit(self, windows, origins, init, *, model, gain=1.0, offset=None, fixed=None,
            frame_index=None):
        return self.solver(windows, origins, init, model=model, estimator=self.estimator,
                           max_iter=self.max_iter, tol=self.tol, gain=gain, xp=self.xp,
                           offset=offset, fixed=fixed)


@dataclass(frozen=True)
class KernelEngine(FitEngine):
    """The fused CUDA kernel (CuPy only), reading each window in place from ``stack``.

    The kernel has no held-parameter mask: fits with ``fixed`` (the held-width refits of
    ``fit_atoms``) run the array code of :class:`ArrayEngine` on the same device.
    """

    name: ClassVar[str] = "kernel"

    def fit(self, windows, origins, init, *, model, gain=1.0, offset=None, fixed=None,
            frame_index=None):
        if fixed is not None:
            return ArrayEngine(self.stack, self.xp, self.estimator, self.max_iter,
                               self.tol).fit(windows, origins, init, model=model, gain=gain,
                                             offset=offset, fixed=fixed)
        from .cuda import lm_fit_kernel

        return lm_fit_kernel(self.stack, frame_index, origins, init, window=windows.shape[1],
                             model=model.name, estimator=self.estimator,
                             max_iter=self.max_iter, tol=self.tol, gain=gain, offset=offset)


def make_engine(engine, backend, stack, *, estimator="mle", max_iter=50,
                tol=1e-7) -> FitEngine:
    """The engine for ``fit_atoms(engine=...)`` on ``backend`` (see the module table).

    Raises
    ------
    ValueError
        An unknown ``engine``, or ``"kernel"`` on a backend without a CUDA device.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.engines import make_engine
    >>> from stemgpu.backend import resolve_backend
    >>> make_engine("auto", resolve_backend("numpy"), np.zeros((1, 8, 8))).name
    'array'
    """
    check_choice(engine, "engine", ENGINES)
    if engine == "kernel" and not backend.is_gpu:
        raise ValueError(
            "engine='kernel' needs the CuPy backend (a CUDA device); use engine='array' or "
            "'auto' on NumPy"
        )
    cls = KernelEngine if backend.is_gpu and engine != "array" else ArrayEngine
    return cls(stack=stack, xp=backend.xp, estimator=estimator, max_iter=int(max_iter),
               tol=float(tol))
