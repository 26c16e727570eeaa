"""The ``stemgpu`` command: ``info``, ``demo``, ``run`` and ``bench``.

Errors a user can fix (a missing file, a bad option, an unavailable backend) end with a
one-line message on stderr and a non-zero exit code, never a traceback:

====  =====================================================
code  meaning
====  =====================================================
0     success
1     the analysis ran but failed (e.g. no atoms found)
2     bad command line (argparse)
3     bad input file or option value
4     requested backend unavailable
====  =====================================================
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_BACKEND = 0, 1, 2, 3, 4
STEP_NAMES = ("rigid", "demons", "atoms", "cells")


class _Quiet:
    """Print helper that honours --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, *args, **kwargs):
        if not self.quiet:
            print(*args, **kwargs)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("stemgpu", "numpy", "scipy", "h5py", "sidpy", "pyNSID", "matplotlib",
                 "scikit-image", "cupy-cuda12x", "cupy-cuda13x", "cucim-cu12", "cucim-cu13"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, available backends, device name and memory."""
    import platform

    from .backend import available_backends, resolve_backend

    print(f"stemgpu on Python {platform.python_version()} ({platform.machine()})")
    for name, version in _versions().items():
        print(f"  {name:<14} {version}")
    print("backends:")
    for name, state in available_backends().items():
        print(f"  {name:<6} {state}")
        if state == "available":
            be = resolve_backend(name)
            print(f"         device: {be.device_name}, free memory "
                  f"{be.free_memory() / 1024**3:.1f} GiB")
    from .kernel_sources import kernel_dir

    print(f"CUDA kernel sources: {kernel_dir()}")
    return EXIT_OK


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number (pm per pixel); got {text}")
    return value


def _parse_steps(text: str) -> tuple[str, ...]:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in steps if s not in STEP_NAMES]
    if bad or not steps:
        raise argparse.ArgumentTypeError(
            f"--steps {text!r}: unknown step(s) {bad}; choose from {','.join(STEP_NAMES)}"
        )
    return steps


def read_input(path: str, *, pixel_size: float | None = None):
    """Open ``path`` as a calibrated sidpy Dataset: Nion ``.ndata1``/``.h5`` or pyNSID HDF5.

    Raises ``ValueError`` with a one-line message naming the file for anything else.
    """
    import os

    from .io.nion import NionFormatError, read_nion

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a data file")
    if _is_results_file(path):
        raise ValueError(f"{path}: a stemgpu results file (written by stemgpu.save), not "
                         "microscope data; open it with stemgpu.load in Python")
    try:
        return read_nion(path, lazy=False, pixel_size=pixel_size)
    except NionFormatError as nion_error:
        if not path.lower().endswith((".h5", ".hdf5", ".nsid")):
            raise
        dataset = _read_nsid(path)
        if dataset is None:
            raise ValueError(f"{path}: neither a Nion file ({nion_error}) nor an HDF5 file "
                             "holding a pyNSID image or image stack") from None
        return dataset


def _frame_source(path: str, pixel_size):
    """A lazy Nion stack of >= 3 frames (streamed by rigid registration), else None."""
    from .io.nion import NionFormatError, open_frames

    if not os.path.isfile(path):
        return None  # read_input reports missing files, folders and results files
    try:
        source = open_frames(path, pixel_size=pixel_size)
    except (NionFormatError, ValueError, OSError):
        return None  # read_input reports the problem in its own words
    if len(source.shape) != 3 or source.shape[0] < 3:
        source.close()
        return None
    return source


def _is_results_file(path: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return "stemgpu_format" in fh.attrs
    except OSError:
        return False


def _read_nsid(path: str):
    """The first 2-D or 3-D pyNSID main dataset of an HDF5 file, loaded, or None."""
    import warnings

    import h5py
    import numpy as np

    from ._inputs import pixel_size_from_dataset
    from .io.sidpy_io import to_dataset

    try:
        fh = h5py.File(path, "r")
    except OSError:
        return None
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from pyNSID.io.hdf_utils import get_all_main, read_h5py_dataset

            mains = get_all_main(fh)
        except Exception:  # a foreign HDF5 layout: the caller reports it in one line
            return None
        for dset in mains:
            if dset.ndim not in (2, 3):
                continue
            ds = read_h5py_dataset(dset)
            data = np.asarray(ds)
            px = pixel_size_from_dataset(ds)
            return to_dataset(data, pixel_size=px, title=str(getattr(ds, "title", "") or "data"),
                              metadata=dict(getattr(ds, "metadata", {}) or {}))
    return None


IMAGE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps", ".webp")


def check_output_paths(out, figure) -> None:
    """Fail before any work when a results file or figure could not be written."""
    import os

    for option, target in (("--out", out), ("--figure", figure)):
        if not target:
            continue
        folder = os.path.dirname(os.path.abspath(os.fspath(target)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {target}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{option} {target}: folder {folder} is not writable")
        if os.path.isdir(os.fspath(target)):
            raise IsADirectoryError(f"{option} {target}: is a directory")
    if figure and os.path.splitext(os.fspath(figure))[1].lower() not in IMAGE_FORMATS:
        raise ValueError(f"--figure {figure}: not an image file name; use one of "
                         + ", ".join(IMAGE_FORMATS))


def run_file(path, *, out=None, backend=None, steps=STEP_NAMES, pixel_size=None,
             quiet=False, figure=None) -> int:
    """``stemgpu run``: analyse a file, print the summary, save results; returns exit code."""
    import os

    from .backend import to_host
    from .io.results import save
    from .pipeline import analyze
    from .report import save_report

    say = _Quiet(quiet)
    out = out or os.path.splitext(os.fspath(path))[0] + "-stemgpu.h5"
    if os.path.abspath(out) == os.path.abspath(os.fspath(path)):
        raise ValueError(f"--out {out}: would overwrite the input file")
    check_output_paths(out, figure)
    steps = tuple(steps)
    source = _frame_source(os.fspath(path), pixel_size) if "demons" not in steps \
        and "rigid" in steps else None
    ds = source if source is not None else read_input(os.fspath(path), pixel_size=pixel_size)
    if ds.ndim == 2 and {"rigid", "demons"} & set(steps):
        steps = tuple(s for s in steps if s not in ("rigid", "demons"))
        say(f"{path}: a single image; running {', '.join(steps) or 'nothing'}")
        if not steps:
            raise ValueError("--steps: rigid/demons need an image stack; this file holds one "
                             "image")
    if ds.ndim == 3 and ds.shape[0] < 3 and "rigid" in steps:
        raise ValueError(f"{path}: {ds.shape[0]} frame(s); rigid registration needs at least 3 "
                         "(use --steps atoms,cells to fit the mean of these frames)")
    if source is not None:
        say(f"{path}: streaming the frames from disk (only the registered mean is kept)")
    try:
        analysis = analyze(ds, pixel_size=pixel_size, steps=steps, backend=backend,
                           progress=not quiet)
    finally:
        if source is not None:
            source.close()
    say(f"{path}: {tuple(ds.shape)} at {analysis.pixel_size_pm:g} pm/px")
    say(analysis.summary(as_text=True))
    save(analysis, out, overwrite=True, source=os.fspath(path))
    say(f"results: {os.path.abspath(out)}")
    if figure:
        say(f"report figure: {save_report(analysis, figure)}")
    if analysis.atoms is not None:
        ok = to_host(analysis.atoms.status) == 0
        if not ok.any():
            print(f"stemgpu: {path}: no atom column fit converged", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def quick_bench(*, size: int = 512, frames: int = 10) -> int:
    """``stemgpu bench``: time each stage on every available backend, print a table."""
    import time

    from .backend import available_backends, resolve_backend
    from .synthetic import simulate_stack

    if size < 64 or frames < 3:
        raise ValueError(f"--size must be >= 64 and --frames >= 3; got {size}, {frames}")
    stack, truth = simulate_stack((frames, size, size), frame_jitter_px=0.3,
                                  line_jitter_px=0.05, seed=0)
    names = [n for n, state in available_backends().items() if state == "available"]
    from .atoms.fit import fit_atoms
    from .registration.demons import register_demons
    from .registration.rigid import register_rigid

    keep = truth.visible(0, margin=10)
    start = truth.image_positions(0)[keep]

    stages = {
        "rigid": lambda be, s: register_rigid(s, backend=be),
        "demons (20 it.)": lambda be, s: register_demons(s, iterations=20, backend=be),
        "fit (frame 0)": lambda be, s: fit_atoms(s[0], start, sigma=truth.probe_sigma_px,
                                                 backend=be),
    }
    table = {}
    for name in names:
        be = resolve_backend(name)
        data = be.asarray(stack)
        for stage, fn in stages.items():
            fn(be, data)  # warm-up: kernel compilation, FFT plans
            be.synchronize()
            t = time.perf_counter()
            fn(be, data)
            be.synchronize()
            table[(stage, name)] = time.perf_counter() - t
    print(f"stemgpu bench: {frames} x {size} x {size} SrTiO3 stack, {int(keep.sum())} columns")
    head = "stage".ljust(18) + "".join(n.rjust(12) for n in names)
    print(head)
    for stage in stages:
        print(stage.ljust(18) + "".join(f"{table[(stage, n)]:11.3f}s" for n in names))
    for name in names:
        be = resolve_backend(name)
        print(f"{name}: {be.device_name}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a SrTiO3 stack with known truth, analyse it, compare with the truth."""
    from .demo import run_demo

    return run_demo(out=args.out, backend=args.backend, quiet=args.quiet, frames=args.frames,
                    size=args.size, seed=args.seed, figure=args.figure)


def cmd_run(args: argparse.Namespace) -> int:
    """Analyse a Nion / HDF5 file."""
    return run_file(args.file, out=args.out, backend=args.backend, steps=args.steps,
                    pixel_size=args.pixel_size, quiet=args.quiet, figure=args.figure)


def cmd_bench(args: argparse.Namespace) -> int:
    """Quick backend comparison on this machine."""
    return quick_bench(size=args.size, frames=args.frames)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``stemgpu: error: ...``, exit 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stemgpu",
        description="Quantitative atomic-resolution STEM: registration, atom fitting, "
        "unit cells and strain on NumPy or CuPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="versions, backends, device")
    p.set_defaults(func=cmd_info)

    backend_help = "numpy, cupy or auto (default: STEMGPU_BACKEND, else auto)"
    p = sub.add_parser("demo", help="simulate a SrTiO3 stack and analyse it end to end")
    p.add_argument("--out", default="stemgpu-demo.h5", help="results file (default %(default)s)")
    p.add_argument("--figure", default="stemgpu-demo.png", help="report figure (PNG)")
    p.add_argument("--backend", default=None, help=backend_help)
    p.add_argument("--frames", type=int, default=16, help="frames to simulate")
    p.add_argument("--size", type=int, default=512, help="frame size in pixels")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="analyse a Nion (.ndata1/.h5) or stemgpu HDF5 file")
    p.add_argument("file")
    p.add_argument("--out", default=None, help="results file (default FILE-stemgpu.h5)")
    p.add_argument("--figure", default=None, help="report figure (PNG)")
    p.add_argument("--backend", default=None, help=backend_help)
    p.add_argument("--steps", type=_parse_steps, default=STEP_NAMES,
                   help="comma-separated subset of " + ",".join(STEP_NAMES))
    p.add_argument("--pixel-size", type=_positive_float, default=None,
                   help="pixel size in pm (overrides the file's calibration)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="quick backend comparison on this machine")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=10)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stemgpu`` console script."""
    from .backend import BackendUnavailableError
    from .pipeline import AnalysisError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BackendUnavailableError as exc:
        return _fail(exc, EXIT_BACKEND)
    except AnalysisError as exc:
        return _fail(exc, EXIT_FAILED)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    except (ValueError, TypeError, OSError) as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("stemgpu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line, and a non-zero exit
        return _fail(f"internal error ({type(exc).__name__}: {exc}); please report it with "
                     "the command that caused it", EXIT_FAILED)


def _fail(exc, code: int) -> int:
    """One line on stderr, in the CLI's words (``--pixel-size``, not ``pixel_size=``)."""
    text = " ".join(str(exc).split())
    text = text.replace("pixel_size=", "--pixel-size ")
    print(f"stemgpu: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
