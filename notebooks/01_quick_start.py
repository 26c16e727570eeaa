# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Quick start: from a frame stack to the unit-cell table
#
# A high-resolution HAADF-STEM series is usually recorded as a *stack* of short, fast frames
# rather than one long exposure: every frame is noisy, but the sample drifts (and the scan
# jitters) much less during one frame than during a single slow scan. To get picometre
# precision back, the frames have to be registered and averaged, the atom columns fitted and
# the unit cells measured. `stemgpu.analyze` does all of that in one call:
#
# 1. **rigid** registration (sub-pixel frame offsets) and a drift/jitter report,
# 2. **demons** (non-rigid) registration for the residual scan distortions,
# 3. **atoms**: find and fit every atom column of the registered mean,
# 4. **cells**: unit cells of the A-site columns, their geometry, strain and the
#    B-site displacement.
#
# This notebook runs on a *simulated* SrTiO$_3$ [001] stack whose truth is known exactly, so
# every number can be checked. The same calls work on NumPy (CPU) or CuPy (GPU) arrays.
#
# Set `STEMGPU_NOTEBOOK_SMALL=1` in the environment to run everything on small images
# (that is what the test suite does).

# %%
import io
import json
import os
import shutil
import tempfile
import zipfile

import matplotlib.pyplot as plt
import numpy as np

import stemgpu
from stemgpu.app import DEMO, compare, demo_stack, demo_truth

SMALL = os.environ.get("STEMGPU_NOTEBOOK_SMALL", "") not in ("", "0")
FRAMES, SIZE = (6, 160) if SMALL else (16, 512)
print(f"stemgpu {stemgpu.__version__}, backend {stemgpu.get_backend().name}; "
      f"stack of {FRAMES} frames x {SIZE} x {SIZE} px")

# %% [markdown]
# ## A simulated stack with known truth
#
# `demo_stack` renders SrTiO$_3$ viewed along [001] at 14.6 pm per pixel with about 100
# counts on a Sr column per frame: linear drift, random frame-to-frame jitter of ~3 pm,
# scan-line jitter, a slight scan distortion and a B-site (Ti-O column) displacement of
# (2, 6) pm (row, col). Every pixel is rendered at the true probe position, so the truth does
# not come from any algorithm of the library.
#
# A single frame is very noisy: you can see the bright Sr columns and, barely, the weaker
# Ti-O columns at the cell centres; the O columns are invisible.

# %%
stack, truth = demo_stack(frames=FRAMES, size=SIZE, seed=2026)
print("stack", stack.shape, stack.dtype, "| demo parameters:", DEMO)

fig, axes = plt.subplots(1, 2, figsize=(10, 5))
axes[0].imshow(stack[0], cmap="gray")
axes[0].set_title("frame 0 (one short exposure)")
axes[1].imshow(stack.mean(axis=0), cmap="gray")
axes[1].set_title(f"plain mean of {FRAMES} frames (not registered)")
for ax in axes:
    ax.set_axis_off()
plt.show()

# %% [markdown]
# The plain mean is blurred because the frames are offset from one another by drift and
# jitter. Registration fixes that.
#
# ## The whole analysis in one call
#
# `pixel_size` is in pm per pixel. With a file from the microscope (below) the calibration
# is read from the file and `pixel_size` can be left out. `progress=True` (the default) shows
# progress bars per stage.

# %%
res = stemgpu.analyze(stack, pixel_size=DEMO["pixel_size_pm"], progress=False)
print(repr(res))
print("timings (s):", {k: round(v, 2) for k, v in res.info["timings_s"].items()})

# %% [markdown]
# ## The summary table
#
# Every figure comes with its one-sigma uncertainty: `+/- stat` is the statistical part
# (jitter of `n` frames about the drift fit, least-squares error of the drift rate, bootstrap
# uncertainty of a median over unit cells) and `sys` a known systematic floor of the column
# fits. `std` is the spread over frames or cells: it tells you how much the cells differ from
# one another, not how well the median is known.

# %%
print(res.summary(as_text=True))

# %% [markdown]
# SrTiO$_3$ is cubic (a = 390.5 pm), yet `|a1|` and `|a2|` differ by about a percent and
# the tetragonal distortion is far from zero. That is not noise: the demo stack carries a
# scan distortion of the kind every scanning microscope has (the fast and slow scan axes are
# not calibrated exactly alike). The truth below includes it. On a real instrument you would
# measure it once on a reference crystal with `stemgpu.estimate_distortion` and remove it
# with `stemgpu.correct_distortion`.
#
# ## Compare with the truth
#
# `demo_truth` computes the true value of every row that has an unbiased estimator, from the
# simulation parameters (e.g. the cell figures from the exact, noise-free column positions).
# `|diff|/sigma` is the distance from the truth in units of the total uncertainty: values
# around 1 mean the error bars are honest. Rows whose estimator is biased by construction
# (the smallest and longest of four noisy sides, the length of a noisy vector) are shown but
# not compared.

# %%
text, bad = compare(res, demo_truth(truth))
print(text)
print("\nrows further than 3 sigma from the truth:", bad or "none")

# %% [markdown]
# ## The report figure
#
# One page with the drift trajectory and its jitter, the registered mean with the fitted
# columns (by species), maps of the tetragonal and shear distortion, rotation and B-site
# displacement, and histograms over the unit cells. Pass a path
# (`res.plot_report("report.png")`) to save it as well.

# %%
fig = res.plot_report()
plt.show()

# %% [markdown]
# The individual panels are also available: `res.plot_drift()`, `res.plot_columns()`,
# `res.plot_maps()` and `res.plot_histograms()`. The stage results are attributes:
# `res.rigid`, `res.drift`, `res.demons`, `res.mean_image`, `res.atoms`, `res.species`,
# `res.cells`, `res.statistics`.

# %%
fig, ax = plt.subplots(figsize=(6, 6))
res.plot_columns(ax=ax)
plt.show()
print(res.atoms.status_counts())
print(res.statistics)

# %% [markdown]
# ## Save and load the results
#
# `stemgpu.save` writes everything (every stage's arrays, the options used, versions and
# provenance) to one HDF5 file; registered stacks and mean images are also stored as
# calibrated sidpy datasets that pyNSID and SciFiReaders can read. `stemgpu.load` gives back
# the same `Analysis`, with NumPy arrays. Here we write into a temporary directory.

# %%
workdir = tempfile.mkdtemp(prefix="stemgpu-quick-start-")
path = stemgpu.save(res, os.path.join(workdir, "analysis.h5"), overwrite=True)
print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB")

back = stemgpu.load(path)
print(repr(back))
same = all(np.isclose(back.summary()[k].value, row.value) for k, row in res.summary().items())
print("summary identical after the round trip:", same)

# %% [markdown]
# ## Opening a file from the microscope
#
# Nion Swift data items (`.ndata`, `.h5`) and its exports (NData 1 `.ndata1`, NData HDF
# `.nhdf`, ImageJ TIFF) open as calibrated `sidpy.Dataset`s (DM3/DM4, EMD, TIA and HSPY too,
# with `pip install 'stemgpu[formats]'`):
#
# ```python
# ds = stemgpu.open("file.ndata")           # lazy: memory-mapped, frames read on demand
# ds = stemgpu.open("file.ndata", lazy=False)   # read into memory now
# res = stemgpu.analyze(ds)                 # pixel size (and frame time) from the file
# ```
#
# The dataset carries the pixel size (`ds.metadata["pixel_size_pm"]`), the frame time when
# the file has it (drift rates are then also reported per second) and the complete original
# metadata (`ds.original_metadata`). Pass `pixel_size=` to override a missing or wrong
# calibration.
#
# No real file ships with this notebook, so we write a minimal Nion Swift library item
# (`.ndata`: a zip of `data.npy` and `metadata.json`) of the simulated stack, 14.6 pm per
# pixel in its calibration, and open it the same way.

# %%
nion_path = os.path.join(workdir, "stack.ndata")
props = {"dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""}]
         + [{"offset": 0.0, "scale": 0.0146, "units": "nm"}] * 2,
         "is_sequence": True, "collection_dimension_count": 0, "datum_dimension_count": 2}
npy = io.BytesIO()
np.save(npy, stack.astype("float32"))
with zipfile.ZipFile(nion_path, "w") as zf:
    zf.writestr("data.npy", npy.getvalue())
    zf.writestr("metadata.json", json.dumps(props))
ds = stemgpu.open(nion_path, lazy=False)
print(type(ds).__name__, ds.shape, "pixel size", ds.metadata["pixel_size_pm"], "pm")

res_file = stemgpu.analyze(ds, steps=("rigid", "atoms", "cells"), progress=False)
rows = res_file.summary()
for name in ("jitter_std_x_pm", "jitter_std_y_pm", "a1_length_pm", "a2_length_pm"):
    r = rows[name]
    print(f"{r.label:>16}: {r.value:8.2f} +/- {r.uncertainty:.2f} {r.unit}")

# %%
shutil.rmtree(workdir, ignore_errors=True)
