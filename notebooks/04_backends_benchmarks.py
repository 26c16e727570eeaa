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
# # 04 · Backends (CPU or GPU) and benchmarks
#
# Every algorithm in stemgpu is written once against an array namespace and runs either on
# NumPy (CPU) or on CuPy (an NVIDIA GPU). The numbers are the same to within floating-point
# rounding; only the time differs. Fast enough, a whole analysis can run at the microscope
# while the sample is still in, and decide whether the series is worth keeping.
#
# This notebook shows how the backend is chosen, and times the main stages on the backends
# present on this machine.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import stemgpu

SMALL = os.environ.get("STEMGPU_NOTEBOOK_SMALL", "") not in ("", "0")
FRAMES, SIZE, REPEATS = (6, 128, 2) if SMALL else (16, 512, 3)
PIXEL_PM = 14.6

# %% [markdown]
# ## Which backends are there?
#
# `available_backends()` reports each backend as `"available"` or says why it is not (CuPy
# not installed, no CUDA device, driver too old, ...). `get_backend()` is the backend a call
# would use now.

# %%
for name, state in stemgpu.available_backends().items():
    print(f"{name:6}: {state}")
be = stemgpu.get_backend()
print(f"\ncurrent backend: {be.name} on {be.device_name}")
HAVE_CUPY = stemgpu.available_backends()["cupy"] == "available"

# %% [markdown]
# ## Choosing the backend
#
# From the highest precedence to the lowest:
#
# 1. the `backend=` keyword of a function: `stemgpu.register_rigid(stack, backend="numpy")`;
# 2. the data themselves: CuPy input arrays select CuPy;
# 3. `with stemgpu.use_backend("numpy"): ...` for a block, or `stemgpu.set_backend("numpy")`
#    for the whole session (`set_backend(None)` clears it);
# 4. the environment variable `STEMGPU_BACKEND` (`numpy`, `cupy` or `auto`), e.g.
#    `STEMGPU_BACKEND=numpy jupyter lab` or `STEMGPU_BACKEND=numpy stemgpu run file.ndata1`;
# 5. `"auto"`: CuPy when it imports and a CUDA device works, otherwise NumPy, silently.
#
# Asking explicitly for `"cupy"` where there is no usable GPU raises
# `stemgpu.BackendUnavailableError` with the reason and the install command
# (`pip install 'stemgpu[cuda12]'` or `'stemgpu[cuda13]'`).

# %%
with stemgpu.use_backend("numpy"):
    print("inside use_backend('numpy'):", stemgpu.get_backend())
print("outside:", stemgpu.get_backend())

saved = os.environ.get("STEMGPU_BACKEND")
os.environ["STEMGPU_BACKEND"] = "numpy"
print("with STEMGPU_BACKEND=numpy:", stemgpu.get_backend())
if saved is None:
    del os.environ["STEMGPU_BACKEND"]
else:
    os.environ["STEMGPU_BACKEND"] = saved

if not HAVE_CUPY:
    try:
        stemgpu.set_backend("cupy")
    except stemgpu.BackendUnavailableError as exc:
        print("\nset_backend('cupy') on this machine:\n ", exc)

# %% [markdown]
# ## Data on the GPU
#
# Results stay on the backend they were computed on: with CuPy, `rig.shifts` and
# `rig.registered` are CuPy arrays, so the next stage runs on the GPU without copying. Every
# result has `.to_numpy()` for plotting or saving (`stemgpu.save` does it for you).
# To move data yourself: `backend.asarray(array)` (to the backend) and
# `backend.to_numpy(array)` (to the host).

# %%
stack, truth = stemgpu.simulate_stack((FRAMES, SIZE, SIZE), frame_jitter_px=0.3,
                                      line_jitter_px=0.05, pixel_size_pm=PIXEL_PM, seed=0)
keep = truth.visible(0, margin=10)
start = truth.image_positions(0)[keep]
print(f"stack {stack.shape}, {len(start)} columns to fit in frame 0")

rig = stemgpu.register_rigid(stack, pixel_size=PIXEL_PM, backend="numpy")
print("shifts:", type(rig.shifts), "| registered after to_numpy():",
      type(rig.to_numpy().registered))

# %% [markdown]
# ## Timing the stages
#
# GPU calls return before the work is done, so every timing waits for the device
# (`backend.synchronize()`) before reading the clock. The first call on a backend is run
# once untimed (it compiles the CUDA kernels and plans the FFTs); then the median of a few
# repeats is kept. The data are moved to the backend before timing, so the times exclude
# the host-to-device copy of the input.

# %%
stages = {
    "register_rigid": lambda be, s: stemgpu.register_rigid(s, backend=be),
    "register_demons (20 it.)": lambda be, s: stemgpu.register_demons(
        s, iterations=20, backend=be),
    "fit_atoms (frame 0)": lambda be, s: stemgpu.fit_atoms(
        s[0], start, sigma=truth.probe_sigma_px, backend=be),
}
names = ["numpy"] + (["cupy"] if HAVE_CUPY else [])
times, devices = {}, {}
for name in names:
    with stemgpu.use_backend(name) as backend:
        devices[name] = backend.device_name
        data = backend.asarray(stack)
        for stage, run in stages.items():
            run(backend, data)  # warm-up
            backend.synchronize()
            runs = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                run(backend, data)
                backend.synchronize()
                runs.append(time.perf_counter() - t0)
            times[(stage, name)] = float(np.median(runs))

print(f"{'stage':26}" + "".join(f"{n:>12}" for n in names))
for stage in stages:
    print(f"{stage:26}" + "".join(f"{times[(stage, n)]:11.3f}s" for n in names))
if HAVE_CUPY:
    print("\nspeed-up of cupy over numpy:")
    for stage in stages:
        print(f"  {stage:26} {times[(stage, 'numpy')] / times[(stage, 'cupy')]:6.1f} x")
print(f"\nframes/s (rigid, numpy): {FRAMES / times[('register_rigid', 'numpy')]:.0f}; "
      f"columns/s (fit, numpy): {len(start) / times[('fit_atoms (frame 0)', 'numpy')]:.0f}")

# %%
fig, ax = plt.subplots(figsize=(8, 4))
width = 0.8 / len(names)
x = np.arange(len(stages))
for k, name in enumerate(names):
    values = [times[(stage, name)] for stage in stages]
    ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=name)
ax.set_xticks(x, list(stages))
ax.set_ylabel("time (s, median)")
ax.set_yscale("log")
ax.set_title(f"{FRAMES} x {SIZE} x {SIZE} stack, {len(start)} columns; "
             + ", ".join(f"{n}: {d}" for n, d in devices.items()), fontsize="medium")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Same numbers on every backend
#
# With a GPU present, the registration shifts of both backends should agree far below the
# registration error: the same algorithm, with float32 rounding in a different order.

# %%
if HAVE_CUPY:
    shifts = {n: stemgpu.register_rigid(stack, backend=n).to_numpy().shifts for n in names}
    diff = np.abs(shifts["numpy"] - shifts["cupy"]).max()
    print(f"largest shift difference numpy vs cupy: {diff:.2e} px")
else:
    print("only the numpy backend is available here: nothing to compare")

# %% [markdown]
# ## The benchmark suites
#
# Timings in a notebook are a first look. The repository has two benchmark suites for
# careful numbers (run them from the repository root):
#
# * **pytest-benchmark** (`pip install 'stemgpu[test]'`): every stage on every available
#   backend, next to the reference implementations (scikit-image, SimpleITK, SciPy), with
#   accuracy figures recorded beside the times:
#
#   ```bash
#   python -m pytest benchmarks --benchmark-only
#   STEMGPU_BENCH_FULL=1 python -m pytest benchmarks --benchmark-only   # larger sizes
#   python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
#   python -m benchmarks.report bench.json      # the results as a Markdown table
#   ```
#
# * **GPU suite**, on a machine with a CUDA device: runs the GPU tests, then compares the
#   CUDA fitting kernel with the CuPy array code and NumPy on up to millions of columns:
#
#   ```bash
#   PYTHONPATH=. python -m benchmarks.gpu_suite
#   STEMGPU_BENCH_FULL=1 PYTHONPATH=. python -m benchmarks.gpu_suite
#   ```
#
# For a quick table of the stages on this machine from the command line there is also
# `stemgpu bench`.
