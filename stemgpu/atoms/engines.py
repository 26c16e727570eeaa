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
``compiled``  :func:`stemgpu.atoms._compiled.lm_fit` (numba,     numpy
              one fit per thread iteration, all cores)
``kernel``    :func:`stemgpu.atoms.cuda.lm_fit_kernel` (fused)   cupy
============  =================================================  =========================

``engine="auto"`` (the default of ``fit_atoms``) is the kernel on CuPy; on NumPy the
compiled engine when numba loads and passes its self-test
(:func:`~stemgpu.atoms._compiled.compiled_available`), the array code otherwise. The array
engine stays the reference: the others are tested against it to 1e-6 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_choice
from .lm import LMOutput, lm_fit
from .models import Model

__all__ = ["AUTO", "ENGINES", "ArrayEngine", "CompiledEngine", "FitEngine", "KernelEngine",
           "make_engine"]

_BACKEND_TEXT = {"numpy": "the NumPy backend", "cupy": "the CuPy backend (a CUDA device)"}
_BACKEND_NAME = {"numpy": "NumPy", "cupy": "CuPy"}


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
        The engine's value of ``fit_atoms(engine=...)``, recorded in
        ``AtomFit.parameters["engine"]``.
    backends : tuple of str (class attribute)
        Backends the engine runs on.

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

    (``backends = ("numpy",)`` for a host-only one) plus one entry in ``_ENGINE_CLASSES``
    below, which makes it a value of :data:`ENGINES` and of ``fit_atoms(engine=...)``. An
    engine with its own calling convention overrides :meth:`fit` instead (see
    :class:`KernelEngine`).
    """

    stack: Any
    xp: Any
    estimator: str = "mle"
    max_iter: int = 50
    tol: float = 1e-7
    name: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("numpy", "cupy")

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

    The kernel has no held-parameter mask and no dip (dark-contrast) models: fits with
    ``fixed`` (the held-width refits of ``fit_atoms``) and fits of a model with ``sign`` -1
    run the array code of :class:`ArrayEngine` on the same device.

    Attributes
    ----------
    compute_dtype : {"auto", "float64", "float32"}
        The kernel's arithmetic (see :func:`stemgpu.atoms.cuda.lm_fit_kernel`); ``"auto"``
        is float64 on data-centre GPUs and float32 where the device's FP64 rate is low.
    """

    compute_dtype: str = "auto"
    name: ClassVar[str] = "kernel"
    backends: ClassVar[tuple[str, ...]] = ("cupy",)

    def fit(self, windows, origins, init, *, model, gain=1.0, offset=None, fixed=None,
            frame_index=None):
        if fixed is not None or model.sign < 0:
            return ArrayEngine(self.stack, self.xp, self.estimator, self.max_iter,
                               self.tol).fit(windows, origins, init, model=model, gain=gain,
                                             offset=offset, fixed=fixed)
        from .cuda import lm_fit_kernel

        return lm_fit_kernel(self.stack, frame_index, origins, init, window=windows.shape[1],
                             model=model.name, estimator=self.estimator,
                             max_iter=self.max_iter, tol=self.tol, gain=gain, offset=offset,
                             compute_dtype=self.compute_dtype)


def _compiled_solver(windows, origins, init, **kwargs):
    from ._compiled import CompiledUnsupported
    from ._compiled import lm_fit as compiled_lm_fit

    if getattr(kwargs.get("model"), "sign", 1) < 0:  # dips: no compiled formulas
        return lm_fit(windows, origins, init, **kwargs)
    try:
        return compiled_lm_fit(windows, origins, init, **kwargs)
    except CompiledUnsupported:  # a model without compiled formulas: the reference code
        return lm_fit(windows, origins, init, **kwargs)


@dataclass(frozen=True)
class CompiledEngine(ArrayEngine):
    """The LM of :mod:`stemgpu.atoms.lm` compiled for the CPU (numba, NumPy backend only):
    one fit per loop iteration over all cores, normal equations in registers; models it has
    no formulas for (and dark-contrast models) run the array code."""

    name: ClassVar[str] = "compiled"
    backends: ClassVar[tuple[str, ...]] = ("numpy",)
    solver: ClassVar[Any] = staticmethod(_compiled_solver)


#: The engines by name; ``"auto"`` picks :data:`AUTO` of the backend.
_ENGINE_CLASSES = {cls.name: cls for cls in (ArrayEngine, CompiledEngine, KernelEngine)}
#: Values of ``fit_atoms(engine=...)``.
ENGINES = ("auto", *_ENGINE_CLASSES)
#: ``engine="auto"``: the fused kernel on CuPy; on NumPy the compiled engine (the array code
#: when numba cannot load, see :func:`_auto_engine`).
AUTO = {"numpy": "compiled", "cupy": "kernel"}


def _auto_engine(backend_name: str) -> str:
    name = AUTO[backend_name]
    if name == "compiled":
        from ._compiled import compiled_available

        if not compiled_available()[0]:
            return "array"
    return name


def make_engine(engine, backend, stack, *, estimator="mle", max_iter=50,
                tol=1e-7) -> FitEngine:
    """The engine for ``fit_atoms(engine=...)`` on ``backend`` (see the module table).

    Raises
    ------
    ValueError
        An unknown ``engine``, or one that does not run on ``backend``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.engines import make_engine
    >>> from stemgpu.backend import resolve_backend
    >>> make_engine("array", resolve_backend("numpy"), np.zeros((1, 8, 8))).name
    'array'
    >>> make_engine("auto", resolve_backend("numpy"), np.zeros((1, 8, 8))).name in (
    ...     "compiled", "array")  # "array" only where numba cannot load
    True
    """
    check_choice(engine, "engine", ENGINES)
    cls = _ENGINE_CLASSES[_auto_engine(backend.name) if engine == "auto" else engine]
    if backend.name not in cls.backends:
        needs = " or ".join(_BACKEND_TEXT[b] for b in cls.backends)
        raise ValueError(f"engine={engine!r} needs {needs}; use engine='array' or 'auto' on "
                         f"{_BACKEND_NAME[backend.name]}")
    return cls(stack=stack, xp=backend.xp, estimator=estimator, max_iter=int(max_iter),
               tol=float(tol))
