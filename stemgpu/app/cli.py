"""The ``stemgpu`` command: ``info``, ``demo``, ``run`` and ``bench``.

Errors a user can fix (a missing file, a bad option, an unavailable backend) end with a
one-line message on stderr and a non-zero exit code (:mod:`stemgpu.app.errors`), never a
traceback:

====  =====================================================
code  meaning
====  =====================================================
0     success
1     the analysis ran but failed (e.g. no atoms found)
2     bad command line (argparse: unknown command or option, missing value)
3     bad input file or option value (``--pixel-size -3``, ``--steps warp``)
4     requested backend unavailable
====  =====================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_USAGE, AnalysisError
from .steps import ALL_STEPS, STEPS, parse_step_names

__all__ = ["EXIT_BACKEND", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE",
           "build_parser", "main"]


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

    from ..backend import available_backends, resolve_backend

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
    from ..atoms.cuda import kernel_dir

    print(f"CUDA kernel sources: {kernel_dir()}")
    return EXIT_OK


class _BadValue(str):
    """A well-formed command line with a bad option value: argparse type functions return it
    (raising would make argparse exit 2) and :func:`main` exits 3 with it as the message."""


def _positive_float(text: str) -> float | _BadValue:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        return _BadValue(f"--pixel-size must be a positive number (pm per pixel); got {text!r}")
    return value


def _parse_steps(text: str) -> tuple[str, ...] | _BadValue:
    try:
        return parse_step_names(text)
    except ValueError as exc:
        return _BadValue(f"--steps {text!r}: {exc}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a SrTiO3 stack with known truth, analyse it, compare with the truth."""
    from .demo import run_demo

    return run_demo(out=args.out, backend=args.backend, quiet=args.quiet, frames=args.frames,
                    size=args.size, seed=args.seed, figure=args.figure)


def cmd_run(args: argparse.Namespace) -> int:
    """Analyse a Nion / HDF5 file."""
    from .run import run_file

    return run_file(args.file, out=args.out, backend=args.backend, steps=args.steps,
                    pixel_size=args.pixel_size, quiet=args.quiet, figure=args.figure,
                    contrast=args.contrast, scheduler=args.scheduler, workers=args.workers)


def cmd_batch(args: argparse.Namespace) -> int:
    """Analyse many files: a results file each and a summary table of all."""
    from .batch import run_batch

    return run_batch(args.files, out_dir=args.out_dir, scheduler=args.scheduler,
                     workers=args.workers, resume=args.resume, steps=args.steps,
                     backend=args.backend, pixel_size=args.pixel_size, quiet=args.quiet)


def _add_scheduler_options(p, what: str) -> None:
    """``--scheduler`` and ``--workers``, the same for ``run`` and ``batch``."""
    p.add_argument("--scheduler", default=None,
                   help="local, local-cuda, a scheduler address or scheduler file: " + what)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes of a local cluster (default: one per core/GPU)")


def _add_batch_parser(sub, backend_help: str) -> None:
    p = sub.add_parser("batch", help="analyse many files: a results file each in --out-dir "
                       "and a summary table (summary.csv); exit 5 when some failed")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--out-dir", required=True,
                   help="folder for FILE-stemgpu.h5 per input and summary.csv")
    _add_scheduler_options(p, "one dask.distributed task per file (default: one after "
                           "another here)")
    p.add_argument("--resume", action="store_true",
                   help="skip files whose results file in --out-dir is complete")
    p.add_argument("--backend", default=None, help=backend_help)
    p.add_argument("--steps", type=_parse_steps, default=STEPS,
                   help="comma-separated subset of " + ",".join(ALL_STEPS)
                   + " (default " + ",".join(STEPS) + ")")
    p.add_argument("--pixel-size", type=_positive_float, default=None,
                   help="pixel size in pm (overrides every file's calibration)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_batch)


def cmd_bench(args: argparse.Namespace) -> int:
    """Quick backend comparison on this machine."""
    from .bench import quick_bench

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

    p = sub.add_parser("run", help="analyse a microscope file (Nion .ndata/.ndata1/.h5/.nhdf/.tif, "
                         "pyNSID HDF5; DM3/DM4, EMD, TIA, HSPY with stemgpu[formats])")
    p.add_argument("file")
    p.add_argument("--out", default=None, help="results file (default FILE-stemgpu.h5)")
    p.add_argument("--figure", default=None, help="report figure (PNG)")
    p.add_argument("--backend", default=None, help=backend_help)
    p.add_argument("--steps", type=_parse_steps, default=STEPS,
                   help="comma-separated subset of " + ",".join(ALL_STEPS)
                   + " (default " + ",".join(STEPS) + ")")
    p.add_argument("--pixel-size", type=_positive_float, default=None,
                   help="pixel size in pm (overrides the file's calibration)")
    p.add_argument("--contrast", choices=("bright", "dark", "auto"), default="bright",
                   help="columns brighter than the background (HAADF/ADF), darker (ABF/BF), "
                   "or auto: chosen from the image (default %(default)s)")
    _add_scheduler_options(p, "the rigid, demons and tracking frame batches as "
                           "dask.distributed tasks (default: all in this process)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    _add_batch_parser(sub, backend_help)

    p = sub.add_parser("bench", help="quick backend comparison on this machine")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=10)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stemgpu`` console script."""
    from ..backend import BackendUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [v for v in vars(args).values() if isinstance(v, _BadValue)]
    if bad:  # the README's exit code for a bad option value, not argparse's 2
        return _fail(bad[0], EXIT_BAD_INPUT)
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
