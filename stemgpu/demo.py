"""Old home of the demo, now :mod:`stemgpu.app.demo` (kept for old imports)."""

from __future__ import annotations

from .app.demo import BIASED, DEMO, compare, demo_stack, demo_truth, run_demo

__all__ = ["BIASED", "DEMO", "compare", "demo_stack", "demo_truth", "run_demo"]
