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
# # 02 · Registration, drift and jitter
#
# Between two frames of a STEM series the image moves: slowly and steadily because the stage
# and the sample drift (thermal and mechanical relaxation), and randomly from frame to frame
# because of vibrations, stray fields and scan-coil noise (*jitter*). Within a frame the scan
# lines themselves are displaced a little along the fast-scan direction (*line jitter*), which
# distorts the lattice non-rigidly.
#
# This notebook looks at the two registration steps separately:
#
# * `stemgpu.register_rigid`: one sub-pixel translation per frame, split by
#   `stemgpu.drift_report` into a smooth drift and the frame jitter, in picometres;
# * `stemgpu.register_demons`: a smooth displacement field per frame for what a translation
#   cannot describe.
#
# Because the stack is simulated, every measured shift is compared with the true one.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import stemgpu
from stemgpu.registration.demons import warp

try:
    from skimage.registration import phase_cross_correlation
except ImportError:  # scikit-image is optional: the comparison below is skipped without it
    phase_cross_correlation = None

SMALL = os.environ.get("STEMGPU_NOTEBOOK_SMALL", "") not in ("", "0")
FRAMES, SIZE = (8, 160) if SMALL else (20, 512)
PIXEL_PM = 14.6

# %% [markdown]
# ## A stack with drift, frame jitter and line jitter
#
# Drift of (0.25, -0.15) px per frame (row, col), random frame jitter of 0.2 px (2.9 pm)
# standard deviation per axis, line jitter of 0.08 px along the fast axis, at 14.6 pm per
# pixel and 200 counts on a Sr column per frame.

# %%
stack, truth = stemgpu.simulate_stack(
    (FRAMES, SIZE, SIZE), drift_px=(0.25, -0.15), frame_jitter_px=0.2, line_jitter_px=0.08,
    bsite_displacement_pm=(2.0, 6.0), pixel_size_pm=PIXEL_PM, seed=1)
print(stack.shape, stack.dtype)

# %% [markdown]
# ## Rigid registration
#
# Each frame is cross-correlated with the mean of the other frames (after a Hann window), the
# correlation peak is refined to 1/100 px by an upsampled DFT, and the frames are shifted by
# Fourier interpolation. The result holds
#
# * `shifts`: (n, 2) shift in px (row, col) that moves each frame onto the reference,
#   `shifts_pm` the same in pm;
# * `quality`: the normalised correlation peak (close to 1 when frames share the lattice);
# * `flagged`: frames whose registration is doubtful (low quality, peak on a search limit);
# * `registered`: the shifted stack, and `mean` its average.

# %%
t0 = time.perf_counter()
rig = stemgpu.register_rigid(stack, pixel_size=PIXEL_PM)
print(f"register_rigid: {time.perf_counter() - t0:.2f} s on {stemgpu.get_backend().name}")
print("quality:", np.round(rig.quality, 3))
print("flagged frames:", np.flatnonzero(rig.flagged).tolist() or "none")
print("shifts (pm):\n", np.round(rig.shifts_pm, 2))

# %% [markdown]
# ### How close to the truth?
#
# `truth.registration_shifts("mean")` gives the true shift of every frame onto the frame at
# the mean offset, in the same sign convention (scikit-image's: the shift to *apply* to the
# frame). Both sets have zero mean, so they can be compared directly.

# %%
true_shifts = truth.registration_shifts("mean")
err = rig.shifts - true_shifts
rms_px = np.sqrt(np.mean(err**2, axis=0))
print(f"RMS error (row, col): {rms_px[0]:.4f}, {rms_px[1]:.4f} px = "
      f"{rms_px[0] * PIXEL_PM:.3f}, {rms_px[1] * PIXEL_PM:.3f} pm")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for k, name in ((1, "x (col)"), (0, "y (row)")):
    axes[0].plot(true_shifts[:, k] * PIXEL_PM, "-", label=f"{name} truth")
    axes[0].plot(rig.shifts_pm[:, k], "o", ms=4, label=f"{name} measured")
    axes[1].plot(err[:, k] * PIXEL_PM, "o-", ms=4, label=name)
axes[0].set(xlabel="frame", ylabel="shift (pm)", title="measured and true shifts")
axes[1].axhline(0, color="0.5", lw=0.8)
axes[1].set(xlabel="frame", ylabel="measured - true (pm)", title="registration error")
for ax in axes:
    ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# The registration error should come out at a fraction of a picometre, well below the
# jitter of a few picometres measured next: the shifts are then a faithful record of how the
# probe moved between frames.
#
# ## Drift or jitter?
#
# `drift_report` fits a smooth drift (linear by default; `model="poly"` or `"spline"` for
# curved trajectories) to the shifts and calls the residual *jitter*. It reports both the
# jitter about the fit and the raw frame-to-frame figure, plus the lag-1 autocorrelation of
# the residual: near zero (or negative, for few frames) when the residual is independent
# frame jitter, clearly positive when the drift model missed part of the motion. Pass
# `frame_time=` (s) to get drift rates per second.

# %%
rep = stemgpu.drift_report(rig)
print(rep)
rep.plot()
plt.show()

# %% [markdown]
# ### Jitter compared with the truth
#
# Three reference values:
#
# * the standard deviation the simulation drew the jitter from (0.2 px);
# * the standard deviation of the jitter actually drawn for this stack (few frames, so it
#   scatters about the former);
# * the same drift report run on the *true* shifts: the same estimator on perfect data, which
#   is what the measured report should reproduce.

# %%
true_rep = stemgpu.drift_report(true_shifts, pixel_size=PIXEL_PM)
drawn = truth.jitter.std(axis=0, ddof=1) * PIXEL_PM
nominal = np.asarray(truth.parameters["frame_jitter_px"]) * PIXEL_PM
print(f"{'':32} {'x (pm)':>8} {'y (pm)':>8}")
print(f"{'simulated jitter, nominal std':32} {nominal[1]:8.2f} {nominal[0]:8.2f}")
print(f"{'simulated jitter, drawn std':32} {drawn[1]:8.2f} {drawn[0]:8.2f}")
print(f"{'drift report on true shifts':32} {true_rep.jitter_std_pm.x:8.2f} "
      f"{true_rep.jitter_std_pm.y:8.2f}")
print(f"{'drift report on measured shifts':32} {rep.jitter_std_pm.x:8.2f} "
      f"{rep.jitter_std_pm.y:8.2f}")
print(f"\ndrift rate (pm/frame): measured x {rep.drift_rate_pm_per_frame.x:.2f}, "
      f"y {rep.drift_rate_pm_per_frame.y:.2f}; true x {true_rep.drift_rate_pm_per_frame.x:.2f},"
      f" y {true_rep.drift_rate_pm_per_frame.y:.2f}")

# %% [markdown]
# ## Comparison with scikit-image
#
# `skimage.registration.phase_cross_correlation` implements the same upsampled-DFT peak
# refinement for one pair of images at a time. We register every frame onto frame 0 with it
# (plain cross-correlation, `normalization=None`, 1/100 px) and with
# `stemgpu.register_rigid(stack, reference=0)`, and compare both with the true shifts onto
# frame 0. stemgpu processes all frames in one batch and applies a Hann window before
# correlating, which suppresses the edge discontinuity of the periodic FFT.
#
# A crystal correlates with itself at every lattice vector, so the correlation has a row of
# nearly equal peaks one unit cell apart. A frame registered onto the *wrong* one is off by a
# whole lattice parameter (390.5 pm here): a *unit-cell jump*. It looks perfectly sharp in the
# average but ruins the drift measurement. Without a window, the wrap-around edges of the
# FFT can tip the balance to a neighbouring peak, especially on small images; stemgpu
# follows the frame-to-frame shifts (consecutive frames move by much less than a cell) and
# searches only near them. Below, jumps are counted separately from the sub-cell error.

# %%
true0 = truth.registration_shifts(0)
t0 = time.perf_counter()
rig0 = stemgpu.register_rigid(stack, reference=0, pixel_size=PIXEL_PM)
t_stemgpu = time.perf_counter() - t0
results = {"stemgpu (reference=0)": (rig0.shifts, t_stemgpu)}

if phase_cross_correlation is None:
    print("scikit-image is not installed: skipping the comparison")
else:
    t0 = time.perf_counter()
    sk = np.array([phase_cross_correlation(stack[0], frame, upsample_factor=100,
                                           normalization=None)[0] for frame in stack])
    results["skimage phase_cross_correlation"] = (sk, time.perf_counter() - t0)

# The lattice here is not rotated: its vectors lie along the image rows and columns.
cell_px = np.linalg.norm(truth.lattice_vectors, axis=1)
for name, (shifts, seconds) in results.items():
    e = (shifts - true0)[1:]  # frame 0 is the reference itself
    jumps = np.round(e / cell_px)  # whole unit cells
    rms = np.sqrt(np.mean((e - jumps * cell_px) ** 2, axis=0)) * PIXEL_PM
    n_jump = int(np.any(jumps != 0, axis=1).sum())
    print(f"{name:32}: {n_jump} of {len(e)} frames off by whole unit cells; within the "
          f"cell RMS error row {rms[0]:.3f} pm, col {rms[1]:.3f} pm; {seconds:.2f} s")

# %% [markdown]
# ## Non-rigid registration with demons
#
# A translation per frame cannot undo line jitter or slow distortions within a frame. The
# demons algorithm estimates a smooth displacement field per frame (`sigma_field` sets its
# smoothness in px) that warps the rigidly registered frame onto the mean:
# `registered[k](x) = frame[k](x + displacement[k](x))`. It is meant for residual motions of
# a pixel or two, so it always runs *after* rigid registration. The result holds
#
# * `registered`: the warped stack and `mean` its average;
# * `displacement`: the fields, shape (n, 2, h, w), (row, col) components in px;
# * `metric_before` / `metric_after`: per-frame mismatch with the reference without and with
#   the field; frames it made worse are `flagged` and left unwarped.

# %%
t0 = time.perf_counter()
dem = stemgpu.register_demons(rig.registered)
print(f"register_demons: {time.perf_counter() - t0:.2f} s")
print("displacement field:", dem.displacement.shape, dem.displacement.dtype)
print("metric before:", np.round(dem.metric_before, 5))
print("metric after: ", np.round(dem.metric_after, 5))
print("flagged:", np.flatnonzero(dem.flagged).tolist() or "none")

# %% [markdown]
# ### Mean image before and after, and one displacement field
#
# At this jitter the difference between the rigid and the demons mean is subtle, so the
# zoomed panels share one grey scale and the difference image is shown beside them. The
# field of one frame shows its column (fast-scan) component: horizontal stripes are line
# jitter.
#
# Less smearing by line jitter should raise the contrast of the mean, but the final warp
# interpolates bilinearly by default (`order=1`), which itself smooths a little. The field
# can be re-applied with cubic B-splines (`order=3`, via
# `stemgpu.registration.demons.warp`) to compare the contrast without that smoothing.

# %%
rigid_mean = np.asarray(rig.registered).mean(axis=0)
demons_mean = np.asarray(dem.mean)
crop = (slice(SIZE // 4, SIZE // 4 + 64), slice(SIZE // 4, SIZE // 4 + 64))
vmin, vmax = np.percentile(rigid_mean[crop], [1, 99.8])
field = np.asarray(dem.displacement[0, 1])
lim = float(np.percentile(np.abs(field), 99))

fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
axes[0].imshow(rigid_mean[crop], cmap="gray", vmin=vmin, vmax=vmax)
axes[0].set_title("rigid mean (zoom)")
axes[1].imshow(demons_mean[crop], cmap="gray", vmin=vmin, vmax=vmax)
axes[1].set_title("demons mean (zoom)")
im = axes[2].imshow(demons_mean[crop] - rigid_mean[crop], cmap="RdBu_r")
axes[2].set_title("demons - rigid")
fig.colorbar(im, ax=axes[2], shrink=0.8)
im = axes[3].imshow(field, cmap="RdBu_r", vmin=-lim, vmax=lim)
axes[3].set_title("frame 0: col displacement (px)")
fig.colorbar(im, ax=axes[3], shrink=0.8)
for ax in axes:
    ax.set_axis_off()
plt.show()
cubic_mean = np.asarray(warp(rig.registered, dem.displacement, order=3)).mean(axis=0)
print("image contrast (std of the zoomed mean):")
for name, image in (("rigid (Fourier shift)", rigid_mean), ("demons, order=1", demons_mean),
                    ("demons field, order=3", cubic_mean)):
    print(f"  {name:22} {image[crop].std():.3f}")

# %% [markdown]
# ### Does the field follow the line jitter?
#
# In the simulation, line `r` of frame `k` was scanned `j[k, r]` px off along the fast axis.
# After rigid registration (which absorbs the frame's average) and relative to the mean of
# the frames, the field that undoes it is about `-(j[k, r] - mean_k j[k, r])` on every line.
# We average the column component of the field along each line (leaving out the borders) and
# correlate it with that. At 0.08 px of line jitter and this dose the field recovers only
# part of it: the demons smoothing (`sigma_field`) trades following single lines against
# noise. A smaller row width, e.g. `sigma_field=(0.5, 4.0)`, follows the lines more closely.

# %%
def line_profile(displacement):
    """Column displacement averaged along each scan line, minus its frame mean: (n, h)."""
    d = np.asarray(displacement)[:, 1, 8:-8, 8:-8].mean(axis=2)
    return d - d.mean(axis=1, keepdims=True)


jit = truth.line_jitter - truth.line_jitter.mean(axis=0, keepdims=True)
jit = jit - jit.mean(axis=1, keepdims=True)
expected = -jit[:, 8:-8]
dem_lines = stemgpu.register_demons(rig.registered, sigma_field=(0.5, 4.0))
for name, result in (("default sigma_field=2", dem), ("sigma_field=(0.5, 4)", dem_lines)):
    r = np.corrcoef(line_profile(result.displacement).ravel(), expected.ravel())[0, 1]
    print(f"{name:22}: correlation with the true line jitter {r:.2f}")

fig, ax = plt.subplots(figsize=(10, 3.5))
rows = np.arange(8, SIZE - 8)
ax.plot(rows, expected[0] * PIXEL_PM, color="0.4", lw=1, label="truth")
ax.plot(rows, line_profile(dem_lines.displacement)[0] * PIXEL_PM, color="C3", lw=1.2,
        label="demons, sigma_field=(0.5, 4)")
ax.set(xlabel="scan line (row)", ylabel="col displacement (pm)",
       title="frame 0: line-by-line displacement along the fast axis")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## Where to go from here
#
# * `stemgpu.register_rigid(..., mode="pairs")` measures all frame pairs and solves for the
#   shifts by least squares, rejecting inconsistent pairs: robust for long series with
#   large drift.
# * `polish=True` refines the shifts by intensity least squares against the mean.
# * Stacks that do not fit in memory (an `h5py.Dataset`, `np.memmap` or the lazy dataset of
#   `stemgpu.open`) are streamed in batches; pass `out=` to write the registered frames.
# * `stemgpu.analyze` runs rigid, drift report and demons in sequence (notebook 01).
