"""``stemgpu bench``: each stage timed on every available backend, on a simulated stack."""

from __future__ import annotations

import time

from .errors import EXIT_OK

__all__ = ["quick_bench"]


def quick_bench(*, size: int = 512, frames: int = 10) -> int:
    """``stemgpu bench``: time each stage on every available backend, print a table."""
    from ..atoms.fit import fit_atoms
    from ..backend import available_backends, resolve_backend
    from ..registration.demons import register_demons
    from ..registration.rigid import register_rigid
    from ..synthetic import simulate_stack

    if size < 64 or frames < 3:
        raise ValueError(f"--size must be >= 64 and --frames >= 3; got {size}, {frames}")
    stack, truth = simulate_stack((frames, size, size), frame_jitter_px=0.3,
                                  line_jitter_px=0.05, seed=0)
    names = [n for n, state in available_backends().items() if state == "available"]
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
