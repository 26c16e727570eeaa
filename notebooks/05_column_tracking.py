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
# # 05 · Every column in every frame: tracking, and error bars checked by the data
#
# The registered mean of a stack is fitted once; the error bar of each column position comes
# from the Fisher information of that fit. Is it right? The frames of a registered stack are
# repeated measurements of the same columns, so they can answer without ground truth:
#
# 1. fit every column in every frame (`stemgpu.track_columns`, one batched fit over
#    frames x columns), starting from the mean's fits;
# 2. remove the frames' common motion (what the registration left), then compare the
#    frame-to-frame scatter of each column with its predicted per-frame error: their ratio
#    per species, the **calibration ratio**, is 1 when the error bars are right;
# 3. flag columns whose trajectory says something happened: a jump (a hop), a column lost
#    from some frame on (a vacancy, damage), an intensity step or a steady fade with dose;
# 4. measure the unit cells in every frame (`stemgpu.frame_series`) and test the lattice
#    parameter for a drift over the series (a beam-induced change).
#
# In `stemgpu.analyze` this is the `"track"` step.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import stemgpu
from stemgpu.atoms.models import get_model
from stemgpu.atoms.windows import render_peaks

SMALL = os.environ.get("STEMGPU_NOTEBOOK_SMALL", "") not in ("", "0")
FRAMES, SIZE = (8, 192) if SMALL else (20, 512)
PIXEL_PM = 14.6

# %% [markdown]
# ## A stack with known truth
#
# SrTiO$_3$ [001], 200 counts on a Sr column per frame, frame jitter of 0.3 px (about 4 pm)
# and a linear drift: the frames differ by their offsets and their Poisson noise only.

# %%
stack, truth = stemgpu.simulate_stack((FRAMES, SIZE, SIZE), dose=200, frame_jitter_px=0.3,
                                      drift_px=(0.05, -0.03), pixel_size_pm=PIXEL_PM, seed=4)
res = stemgpu.analyze(stack, pixel_size=PIXEL_PM, progress=False,
                      steps=("rigid", "atoms", "cells", "track"))
tracks = res.tracks
print(f"{tracks.positions.shape[1]} columns tracked over {tracks.n_frames} frames")
for r in tracks.calibration.values():
    print("calibration ratio", r)

# %% [markdown]
# The ratio is close to 1 for the Sr and Ti-O columns: their error bars describe how much the
# frames really scatter. The gain (counts per data unit) behind the error bars was estimated
# from the fit residuals; give it with `track={"counts_per_unit": ...}` when it is known.
#
# The summary carries the ratios, the flagged columns and frames, and the drift of the
# lattice over the frames:

# %%
rows = res.summary()
for name, row in rows.items():
    if name.startswith(("calibration", "columns_flagged", "frames_flagged", "lattice_drift")):
        print(f"{row.label:>36}: {row.value:.4g} +/- {row.uncertainty:.2g} {row.unit}  "
              f"({row.note})")

# %%
res.plot_tracks()
plt.show()

# %% [markdown]
# ## A column that hops, and one that fades
#
# To see the flags at work we render a scene ourselves: Gaussian columns on a square lattice
# with Poisson noise, where one column hops by half a lattice period in the middle of the
# series and another loses 60 % of its intensity over the frames (as under a damaging beam).

# %%
rng = np.random.default_rng(1)
a, sigma, n_frames = 26.0, 3.0, FRAMES
grid = np.arange(14, 160 - 14, a)
base = np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)
pos = np.broadcast_to(base, (n_frames, len(base), 2)).copy()
amp = np.full((n_frames, len(base)), 300.0)
hop = int(np.argmin(np.square(base - 80).sum(axis=1)))
fade = int(np.argmin(np.square(base - [80, 28]).sum(axis=1)))
pos[n_frames // 2:, hop, 1] += 0.5 * a
amp[:, fade] *= np.linspace(1.0, 0.4, n_frames)
nat = np.zeros((pos.shape[0] * pos.shape[1], 5))
nat[:, 0], nat[:, 1:3], nat[:, 3] = amp.ravel(), pos.reshape(-1, 2), sigma
frames = np.repeat(np.arange(n_frames), len(base))
mu = render_peaks(get_model("gaussian"), nat, frames, (n_frames, 160, 160), 15, np) + 20.0
scene = rng.poisson(mu).astype(np.float32)

moving = stemgpu.track_columns(scene, base, sigma=sigma, counts_per_unit=1)
for i in np.flatnonzero(moving.column_flags):
    print(f"column {i} at {base[i]}: {moving.column_reasons[i]}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
axes[0].plot(moving.amplitudes[:, fade], "o-", label=f"column {fade} (fading)")
axes[0].plot(moving.amplitudes[:, hop], "s-", label=f"column {hop} (hops)")
axes[0].set_xlabel("frame")
axes[0].set_ylabel("fitted amplitude (counts)")
axes[0].legend()
axes[1].imshow(scene[-1], cmap="gray")
flagged = moving.column_flags != 0
axes[1].scatter(base[flagged, 1], base[flagged, 0], s=200, facecolors="none",
                edgecolors="red")
axes[1].set_title("last frame, flagged columns ringed")
axes[1].set_axis_off()
plt.show()

# %% [markdown]
# ## The lattice over the frames
#
# `frame_series` measures the unit cells of every frame from the tracked positions and fits a
# straight line through each median against the frame number. Here nothing changes, and no
# trend is significant; a slope that is would be reported as a drift of the lattice.

# %%
series = res.frame_series
print(series)
