"""The whole analysis (rigid, demons, atoms, cells) on the demo scene, per backend.

Run ``python -m pytest benchmarks/bench_pipeline.py --benchmark-only`` (default: the demo's
16 x 512 x 512 stack, about half a minute per round on a 2-core CPU). ``extra_info`` records
the time of each stage and how many summary rows agree with the simulated truth.
"""

from __future__ import annotations

import pytest

from stemgpu.app import analyze, compare, demo_stack, demo_truth

from .conftest import FULL, sync_call

SIZES = [(16, 512)] + ([(50, 1024)] if FULL else [])


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}x{s[1]}")
def demo_scene(request):
    frames, size = request.param
    return demo_stack(frames, size, seed=2026)


@pytest.mark.benchmark(group="pipeline")
def test_analyze_demo(benchmark, bench_backend, demo_scene):
    stack, truth = demo_scene
    be = bench_backend
    data = be.asarray(stack)
    res = benchmark.pedantic(sync_call, args=(be, analyze, data),
                             kwargs={"pixel_size": truth.pixel_size_pm, "backend": be,
                                     "progress": False},
                             rounds=2, iterations=1, warmup_rounds=0)
    _, bad = compare(res, demo_truth(truth))
    benchmark.extra_info.update({
        "impl": f"stemgpu-{be.name}", "case": "x".join(str(s) for s in stack.shape),
        "device": be.device_name, "stages_s": res.info["timings_s"],
        "rows_off_truth": len(bad)})
    assert not bad
