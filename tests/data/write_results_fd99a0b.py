"""Write the results files of tests/data with the code of the checked-out commit.

Run from the repository root: ``PYTHONPATH=. python tests/data/write_results_fd99a0b.py``.
The files in tests/data were written at commit fd99a0b, before the application code moved
to ``stemgpu/app/``; ``tests/test_io_results.py`` checks that they still load. Run at a
later commit it writes that commit's files: keep the committed ones as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import stemgpu

HERE = Path(__file__).resolve().parent


def main() -> None:
    stack, _ = stemgpu.simulate_stack((3, 96, 96), frame_jitter_px=0.3, seed=7)
    analysis = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid", "atoms", "cells"),
                               progress=False)
    stemgpu.save(analysis, HERE / "analysis_fd99a0b.h5", overwrite=True)
    rigid = stemgpu.register_rigid(stack[:, :32, :32], pixel_size=14.6)
    stemgpu.save(rigid, HERE / "rigid_fd99a0b.h5", overwrite=True)
    expected = {
        "summary_rows": {k: r.as_dict() for k, r in analysis.summary().items()},
        "summary_text": analysis.summary(as_text=True),
        "n_cells": int(analysis.statistics.n_cells),
        "analysis_shifts": np.asarray(analysis.rigid.shifts).tolist(),
        "rigid_shifts": np.asarray(rigid.shifts).tolist(),
        "rigid_mean_sum": float(np.asarray(rigid.mean, dtype=np.float64).sum()),
    }
    (HERE / "expected_fd99a0b.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
