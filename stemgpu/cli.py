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
    from .kernel_sources import kernel_directory

    print(f"CUDA kernel sources: {kernel_directory()}")
    return EXIT_OK


def _parse_steps(text: str) -> tuple[str, ...]:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in steps if s not in STEP_NAMES]
    if bad or not steps:
        raise argparse.ArgumentTypeError(
            f"--steps {text!r}: unknown step(s) {bad}; choose from {','.join(STEP_NAMES)}"
        )
    return steps


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a SrTiO3 stack with known truth, analyse it, compare with the truth."""
    from .pipeline import run_demo

    return run_demo(out=args.out, backend=args.backend, quiet=args.quiet, frames=args.frames,
                    size=args.size, seed=args.seed, figure=args.figure)


def cmd_run(args: argparse.Namespace) -> int:
    """Analyse a Nion / HDF5 file."""
    from .pipeline import run_file

    return run_file(args.file, out=args.out, backend=args.backend, steps=args.steps,
                    pixel_size=args.pixel_size, quiet=args.quiet, figure=args.figure)


def cmd_bench(args: argparse.Namespace) -> int:
    """Quick backend comparison on this machine."""
    from .pipeline import quick_bench

    return quick_bench(size=args.size, frames=args.frames, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemgpu",
        description="Quantitative atomic-resolution STEM: registration, atom fitting, "
        "unit cells and strain on NumPy or CuPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, backends, device")
    p.set_defaults(func=cmd_info)

    backend_help = "numpy, cupy or auto (default: STEMGPU_BACKEND, else auto)"
    p = sub.add_parser("demo", help="simulate a SrTiO3 stack and analyse it end to end")
    p.add_argument("--out", default="stemgpu-demo.h5", help="results file (default %(default)s)")
    p.add_argument("--figure", default="stemgpu-demo.png", help="report figure (PNG)")
    p.add_argument("--backend", default=None, help=backend_help)
    p.add_argument("--frames", type=int, default=12, help="frames to simulate")
    p.add_argument("--size", type=int, default=384, help="frame size in pixels")
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
    p.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size in pm (overrides the file's calibration)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="quick backend comparison on this machine")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stemgpu`` console script."""
    from .backend import BackendUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BackendUnavailableError as exc:
        print(f"stemgpu: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"stemgpu: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, TypeError, OSError) as exc:
        print(f"stemgpu: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("stemgpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
