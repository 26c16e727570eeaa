"""Absolute quality gates of rigid registration, and its bad-input refusals.

Every case renders its scenes with the simulator (never a Fourier-shifted copy): a frame
that "jumped" is rendered with its lattice origin elsewhere, an "unrelated" frame is pure
Poisson noise or a lattice at another rotation. Each case must end in a flag with a reason
(or a refusal), never in an unflagged wrong shift; clean stacks must pass every gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stemgpu
from stemgpu.registration import apply_shifts, drift_report, register_demons, register_rigid
from stemgpu.registration import gates as gates
from stemgpu.registration import warp as demons_warp
from stemgpu.registration._dft import hann_window

PIXEL_PM = 14.6
SIZE = 96


def _stack(seed, **kwargs):
    kwargs.setdefault("frame_jitter_px", 0.5)
    return stemgpu.simulate_stack((6, SIZE, SIZE), pixel_size_pm=PIXEL_PM, dose=20.0, seed=seed,
                                  **kwargs)


def _centred(shifts, true, good):
    err = np.asarray(shifts) - true
    return err - err[good].mean(axis=0)


# ----------------------------------------------------------------------------- fuzz cases


def test_pure_noise_stack_is_refused_frame_by_frame():
    rng = np.random.default_rng(0)
    for shape in ((6, 96, 96), (6, 256, 256)):
        noise = rng.poisson(5.0, shape).astype(np.float32)
        res = register_rigid(noise, backend="numpy")
        assert res.flagged.all()
        assert all("correlation peak not above noise" in r for r in res.flag_reasons)


@pytest.mark.parametrize("kind", ["noise", "rotated"])
def test_two_unrelated_frames_are_flagged_and_the_others_stay_right(kind):
    bad = np.zeros(6, dtype=bool)
    bad[2:4] = True
    for seed in range(3):
        stack, truth = _stack(seed)
        true = truth.registration_shifts("mean")
        clean_jitter = drift_report(register_rigid(stack, backend="numpy",
                                                   pixel_size=PIXEL_PM)).jitter_std_pm
        rng = np.random.default_rng(seed)
        for k, rot in ((2, 17.0), (3, 41.0)):
            if kind == "noise":
                stack[k] = rng.poisson(stack.mean(), (SIZE, SIZE))
            else:
                stack[k] = stemgpu.simulate_stack((1, SIZE, SIZE), dose=20.0, rotation_deg=rot,
                                                  seed=seed + 100 + k)[0][0]
        res = register_rigid(stack, backend="numpy", pixel_size=PIXEL_PM)
        np.testing.assert_array_equal(res.flagged, bad)
        assert all(res.flag_reasons[k] for k in (2, 3))
        assert not any(res.flag_reasons[k] for k in (0, 1, 4, 5))
        err = _centred(res.shifts, true, ~bad)
        assert np.abs(err[~bad]).max() < 0.25, (seed, err)  # was one cell (26 px) off
        # drift_report leaves the flagged frames out: the jitter is that of the clean stack
        jitter = drift_report(res).jitter_std_pm
        assert max(jitter.x, jitter.y) < 2.0 * max(clean_jitter.x, clean_jitter.y) + 5.0


def test_frame_jumped_60_px_is_flagged():
    # On a perfect lattice a 60 px jump is the same image as its alias 60 - 2 * 26.7 = 6.5
    # px: what gives it away is that alias, off the drift of the other frames.
    for seed in range(5):
        stack, truth = _stack(seed, origin_px=(10.3, 20.7))
        stack[3] = stemgpu.simulate_stack((1, SIZE, SIZE), dose=20.0, origin_px=(70.3, 20.7),
                                          seed=seed + 200)[0][0]
        res = register_rigid(stack, max_shift=20, backend="numpy")
        assert res.flagged.tolist() == [False, False, False, True, False, False], seed
        assert "off the drift of the other frames" in res.flag_reasons[3]


def test_shift_at_max_shift_is_flagged_with_its_reason():
    stack, truth = stemgpu.simulate_stack((6, 128, 128), dose=200.0, drift_px=(1.5, 0.0),
                                          seed=3)
    true = truth.registration_shifts("mean")
    res = register_rigid(stack, max_shift=2.0, backend="numpy")
    np.testing.assert_array_equal(res.flagged, np.abs(true[:, 0]) > 2.0)
    for k in np.flatnonzero(res.flagged):
        assert "max_shift" in res.flag_reasons[k]
    assert np.all(np.abs(res.shifts[~res.flagged]) < 2.0)


def test_unit_cell_jump_corrected_when_the_others_agree_flagged_otherwise():
    image = stemgpu.simulate_stack((1, SIZE, SIZE), dose=20.0, seed=0)[0][0]
    rng = np.random.default_rng(1)
    true = np.cumsum(rng.normal(0.0, 0.3, (8, 2)), axis=0)
    shifts = true.copy()
    shifts[5] += (390.5 / PIXEL_PM, 0.0)  # one lattice period along the rows
    shifts[2] += (8.0, 3.0)  # no lattice translation explains this one
    n = len(shifts)
    kwargs = dict(n_eff=gates.effective_pixels(hann_window(np, image.shape), image.shape),
                  limit=None, at_limit=np.zeros(n, bool), inlier_fraction=None,
                  tied=np.ones(n, bool), frame=lambda k: image,
                  window=hann_window(np, image.shape))
    fixed, reasons, corrected = gates.judge(shifts, np.full(n, 0.8), **kwargs)
    assert list(corrected) == [5]
    assert np.abs(fixed[5] - true[5]).max() < 0.3
    assert "no clear unit-cell translation" in reasons[2]
    assert [bool(r) for r in reasons] == [k == 2 for k in range(n)]
    # the same jump in four of eight frames: no consensus, so flagged, not corrected
    split = true.copy()
    split[4:] += (390.5 / PIXEL_PM, 0.0)
    _, reasons, corrected = gates.judge(split, np.full(n, 0.8), **kwargs)
    assert not corrected and sum(bool(r) for r in reasons) >= 1


def test_weak_link_in_the_chain_is_bridged():
    chain = np.cumsum(np.ones((5, 2)), axis=0)
    quality = np.array([0.8, 0.8, 0.01, 0.01, 0.8])  # frame 2 shares nothing with 1 or 3
    calls = []

    def measure(i, j):
        calls.append((i, j))
        return (np.array([2.0, 2.0]), 0.8) if j != 2 else (np.zeros(2), 0.01)

    new, tied = gates.relink(chain, quality, 2500.0, measure)
    assert calls == [(1, 2), (1, 3)]
    assert tied.tolist() == [True, True, False, True, True]
    np.testing.assert_allclose(new[3], new[1] + 2.0)
    same, all_tied = gates.relink(chain, np.full(5, 0.8), 2500.0, measure)
    assert same is chain and all_tied.all()


# ----------------------------------------------------------------------------- clean stacks


def test_clean_stacks_pass_every_gate_over_20_seeds():
    for seed in range(20):
        stack, _ = stemgpu.simulate_stack((6, SIZE, SIZE), pixel_size_pm=PIXEL_PM, dose=20.0,
                                          frame_jitter_px=1.0, drift_px=(0.3, -0.2), seed=seed)
        res = register_rigid(stack, backend="numpy")
        assert not res.flagged.any(), (seed, res.flag_reasons)
        assert res.flag_reasons == ("",) * 6
        assert res.parameters["cell_jumps_corrected"] == {}


def test_clean_default_size_with_drift_passes_every_gate():
    stack, _ = stemgpu.simulate_stack((10, 512, 512), pixel_size_pm=PIXEL_PM, dose=20.0,
                                      frame_jitter_px=0.7, drift_px=(0.25, -0.15), seed=5)
    res = register_rigid(stack, backend="numpy")
    assert not res.flagged.any(), res.flag_reasons


def test_results_saved_before_the_gates_still_load():
    from stemgpu.io import load

    rigid = load(Path(__file__).parent / "data" / "rigid_fd99a0b.h5")
    assert type(rigid) is stemgpu.RigidResult
    assert rigid.flag_reasons == ()


# ----------------------------------------------------------------------------- bad input


def test_upsample_is_bounded():
    stack, _ = _stack(0)
    with pytest.raises(ValueError, match=r"upsample must be an integer >= 1 and <= 1000; "
                       r"got 1000000"):
        register_rigid(stack, upsample=10**6, backend="numpy")
    assert register_rigid(stack, upsample=1000, backend="numpy").parameters["upsample"] == 1000


def test_demons_smoothing_widths_are_bounded():
    stack, _ = stemgpu.simulate_stack((3, 48, 48), dose=None, seed=2)
    for name in ("sigma_field", "sigma_update", "sigma_image"):
        with pytest.raises(ValueError, match=rf"{name} must be at most half the frame size, "
                           r"\(24, 24\) px for frames of 48 x 48 \(or the stack's frames "
                           r"larger\); got 1000000.0"):
            register_demons(stack, backend="numpy", **{name: 1e6})
    with pytest.raises(ValueError, match=r"sigma_field must be at most half .* got \(1.0, 30.0\)"):
        register_demons(stack, sigma_field=(1, 30), backend="numpy")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_demons_reference_without_contrast_is_refused(value):
    stack, _ = stemgpu.simulate_stack((3, 48, 48), dose=None, seed=2)
    with pytest.raises(ValueError, match=r"reference must have contrast .* got a constant image "
                       rf"of value {value:g}"):
        register_demons(stack, reference=np.full((48, 48), value), backend="numpy")


@pytest.mark.parametrize("factor", [1e30, 1e-30])
def test_huge_or_tiny_stack_gives_the_shifts_of_the_plain_one(factor):
    stack, _ = stemgpu.simulate_stack((4, SIZE, SIZE), dose=20.0, frame_jitter_px=1.0, seed=3)
    plain = register_rigid(stack, backend="numpy")
    with np.errstate(all="raise"):  # no overflow anywhere on the way
        scaled = register_rigid(stack * np.float32(factor), backend="numpy")
    # float32 rounding of the scaled pixels can move a 1/100 px grid peak by one step
    np.testing.assert_allclose(scaled.shifts, plain.shifts, atol=0.015)
    np.testing.assert_allclose(scaled.quality, plain.quality, rtol=1e-4)
    assert not scaled.flagged.any()


def test_string_values_get_our_messages():
    stack, _ = _stack(0)
    with pytest.raises(ValueError, match=r"upsample must be an integer .*; got '10'"):
        register_rigid(stack, upsample="10", backend="numpy")
    with pytest.raises(ValueError, match=r"max_shift must be a number > 0 .*; got '5'"):
        register_rigid(stack, max_shift="5", backend="numpy")
    with pytest.raises(ValueError, match=r"shifts must be an \(n, 2\) array of numbers \(px\); "
                       r"got 'ab'"):
        apply_shifts(stack, "ab", backend="numpy")
    with pytest.raises(ValueError, match=r"shifts must be an \(n, 2\) array of numbers"):
        apply_shifts(stack, [["a", "b"]] * 6, backend="numpy")
    with pytest.raises(ValueError, match=r"displacement must be an array of numbers \(px\); "
                       r"got 'x'"):
        demons_warp(stack, "x", backend="numpy")
    with pytest.raises(ValueError, match=r"sigma_field must be a number >= 0 .*; got '2'"):
        register_demons(stack, sigma_field="2", backend="numpy")
    with pytest.raises(ValueError,
                       match=r"max_step must be a finite number >= 1e-06 .*; got '0.5'"):
        register_demons(stack, max_step="0.5", backend="numpy")
