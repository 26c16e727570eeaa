"""Turn a pytest-benchmark JSON run into ``benchmarks/RESULTS.md``.

Usage::

    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python -m benchmarks.report bench.json > benchmarks/RESULTS.md

Every benchmark records in ``extra_info`` which implementation it timed (``impl``: e.g.
``stemgpu-numpy``, ``stemgpu-cupy``, ``skimage``, ``simpleitk``, ``scipy-loop``) and the case
(``case``: e.g. ``10x512x512``). Within a group and case, the table gives each
implementation's median time and its speed relative to every stemgpu implementation, so that
ratios always come from one run on one machine. Accuracy figures in ``extra_info`` (keys
ending in ``_px``, ``_pm`` or ``rms``) are shown beside the times.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _accuracy(extra: dict) -> str:
    keys = [k for k in sorted(extra) if k.endswith(("_px", "_pm", "rms", "_ratio", "per_s"))]
    parts = []
    for k in keys:
        v = extra[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}")
    return ", ".join(parts)


def _time(bench: dict) -> float:
    """Median time; a run timed on a subset and scaled to the full case uses the scaled time."""
    return float(bench.get("extra_info", {}).get("scaled_total_s", bench["stats"]["median"]))


def render(run: dict) -> str:
    """Markdown tables (one per group) from a pytest-benchmark JSON document."""
    machine = run.get("machine_info", {})
    lines = [
        "# Benchmark results",
        "",
        f"Run: {run.get('datetime', '?')}, pytest-benchmark {run.get('version', '?')}.",
        f"Machine: {machine.get('node', '?')}, "
        f"{machine.get('processor') or machine.get('machine')}, "
        f"{machine.get('cpu', {}).get('count', '?')} CPU cores, "
        f"Python {machine.get('python_version', '?')}.",
    ]
    devices = {b.get("extra_info", {}).get("device") for b in run.get("benchmarks", [])}
    devices.discard(None)
    if devices:
        lines.append("Devices: " + ", ".join(sorted(devices)) + ".")
    lines += ["", "Ratios compare implementations measured in this same run.", ""]

    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for bench in run.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        case = str(extra.get("case") or bench.get("param") or "")
        groups[bench.get("group") or "ungrouped"][case].append(bench)

    for group in sorted(groups):
        lines += [f"## {group}", "", "| case | implementation | median | speed-up of stemgpu | "
                  "accuracy |", "|---|---|---|---|---|"]
        for case in sorted(groups[group]):
            benches = groups[group][case]
            ours = [
                b for b in benches if str(b["extra_info"].get("impl", "")).startswith("stemgpu")
            ]
            for b in sorted(benches, key=_time):
                impl = b["extra_info"].get("impl", b["name"])
                median = _time(b)
                if "scaled_total_s" in b["extra_info"]:
                    impl += f" (timed on {b['extra_info'].get('columns_timed')}, scaled)"
                ratios = []
                for o in ours:
                    if o is not b:
                        r = median / _time(o)
                        ratios.append(f"{o['extra_info']['impl']}: {r:.1f}x")
                lines.append(
                    f"| {case} | {impl} | {_fmt_time(median)} | {'; '.join(ratios)} | "
                    f"{_accuracy(b['extra_info'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RUN.json > benchmarks/RESULTS.md",
              file=sys.stderr)
        return 2
    run = json.loads(Path(argv[0]).read_text())
    print(render(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
