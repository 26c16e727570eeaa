"""Batched warping, resampling and smoothing helpers for non-rigid registration.

Every helper takes the backend ``be`` and works on whole batches: images are (B, H, W),
displacement fields (B, 2, H, W) with components (row, col) in px. A field ``d`` warps an
image ``m`` as ``out(x) = m(x + d(x))`` with edge clamping outside the frame.
"""

from __future__ import annotations

import math

from . import _compiled_warp

__all__ = [
    "bilinear", "compose", "downsample", "exponential", "gradient", "resample", "smooth",
    "warp_batch",
]


def _grid(be, h, w, dtype):
    xp = be.xp
    return (xp.arange(h, dtype=dtype)[:, None], xp.arange(w, dtype=dtype)[None, :])


def bilinear(be, channels, disp):
    """Sample ``channels`` (C, B, H, W) at ``x + disp(x)`` with bilinear weights.

    One set of indices and weights is shared by all C channels (the field composition
    warps both components at the same points), which makes this about twice as fast as
    calling ``map_coordinates`` per channel. Coordinates outside the frame are clamped to
    the edge (``mode="nearest"``). Returns (C, B, H, W) in the dtype of ``channels``.

    Each channel is copied into a frame one row and column larger (the last ones repeated),
    so the four neighbours of a sample are the same flat index into four offset views of it:
    one index array serves all gathers, and the edge needs no clamping of its own.
    """
    if _compiled_warp.usable(be, channels, disp):
        return _compiled_warp.bilinear(channels, disp)
    xp = be.xp
    c_, b, h, w = channels.shape
    dt = channels.dtype
    gr, gc = _grid(be, h, w, dt)
    # In-place steps throughout: each fresh full-size temporary costs page faults on a CPU.
    r = gr + disp[:, 0]
    xp.clip(r, 0, h - 1, out=r)
    c = gc + disp[:, 1]
    xp.clip(c, 0, w - 1, out=c)
    hp, wp = h + 1, w + 1
    # 32-bit index arithmetic where it suffices (several times faster on CPUs than 64-bit);
    # the gather index itself is intp, which take() would otherwise convert on every call.
    idt = xp.int32 if b * hp * wp < 2**31 - 1 else xp.intp
    # Coordinates are clamped to be >= 0, so truncation is the floor.
    r0 = r.astype(idt)
    c0 = c.astype(idt)
    r -= r0.astype(dt)
    c -= c0.astype(dt)
    fr, fc = r, c  # fractional parts
    del r, c
    r0 *= wp
    r0 += c0
    r0 += (xp.arange(b, dtype=idt) * (hp * wp))[:, None, None]
    del c0
    i00 = r0.astype(xp.intp, copy=False)
    del r0
    out = xp.empty_like(channels)
    src = xp.empty((b, hp, wp), dtype=dt)
    for k in range(c_):  # C is 1 or 2: a loop over components, never over frames
        src[:, :h, :w] = channels[k]
        src[:, h, :w] = channels[k, :, h - 1]
        src[:, :, w] = src[:, :, w - 1]
        flat = src.reshape(-1)
        # top = a + fc * (b - a) and out = top + fr * (bot - top), in place
        a = flat.take(i00)
        top = flat[1:].take(i00)
        top -= a
        top *= fc
        top += a
        a = flat[wp:].take(i00)
        bot = flat[wp + 1:].take(i00)
        bot -= a
        bot *= fc
        bot += a
        bot -= top
        bot *= fr
        xp.add(bot, top, out=out[k])
    return out


def warp_batch(be, images, disp, order=1):
    """Warp a batch (B, H, W) by fields (B, 2, H, W): ``out(x) = images(x + disp(x))``.

    ``order=1`` uses :func:`bilinear`; other spline orders use ``map_coordinates`` with the
    frame index as an exact integer first coordinate, so one call warps the whole batch (the
    spline prefilter along the frame axis reproduces integer samples exactly, so frames do
    not mix).
    """
    if order == 1:
        return bilinear(be, images[None], disp)[0]
    xp = be.xp
    b, h, w = images.shape
    dt = images.dtype
    gr, gc = _grid(be, h, w, dt)
    coords = xp.empty((3, b, h, w), dtype=dt)
    coords[0] = xp.arange(b, dtype=dt)[:, None, None]
    coords[1] = gr + disp[:, 0]
    coords[2] = gc + disp[:, 1]
    return be.ndimage.map_coordinates(images, coords, order=order, mode="nearest")


def compose(be, field, update):
    """Field of the map ``x -> phi(x + update(x))`` with ``phi(x) = x + field(x)``.

    Returns ``update + field(x + update)``, shape (B, 2, H, W).
    """
    if _compiled_warp.usable(be, field, update):
        return _compiled_warp.compose(field, update)
    xp = be.xp
    moved = bilinear(be, xp.moveaxis(field, 1, 0), update)
    return update + xp.moveaxis(moved, 0, 1)


def exponential(be, velocity, max_norm):
    """Scaling and squaring exponential of a stationary velocity field (B, 2, H, W).

    ``max_norm`` is an upper bound of the pointwise norm of ``velocity`` known without a
    device sync (the step cap); the field is halved until its norm is at most 0.5 px, then
    composed with itself as many times. With ``max_norm <= 0.5`` this is ``velocity`` itself
    (the first-order exponential, as in ITK's diffeomorphic demons).
    """
    n = max(0, math.ceil(math.log2(max_norm / 0.5))) if max_norm > 0 else 0
    v = velocity * (0.5**n) if n else velocity
    for _ in range(n):
        v = compose(be, v, v)
    return v


def smooth(be, array, sigma, truncate=3.0):
    """Separable Gaussian smoothing over the last two axes only (never across frames).

    ``sigma`` is a (row, col) pair in px; zero components are skipped.
    """
    sr, sc = float(sigma[0]), float(sigma[1])
    if sr <= 0 and sc <= 0:
        return array
    if _compiled_warp.usable(be, array):
        return _compiled_warp.gaussian(array, (max(sr, 0.0), max(sc, 0.0)), truncate)
    sig = (0.0,) * (array.ndim - 2) + (sr, sc)
    return be.ndimage.gaussian_filter(array, sig, mode="nearest", truncate=truncate)


def gradient(be, images):
    """Central-difference gradient (B, 2, H, W) of a batch (B, H, W); one-sided at the edges."""
    xp = be.xp
    # numpy.gradient's arithmetic (edge_order=1, unit spacing), written straight into the
    # (B, 2, H, W) output instead of two arrays and a stack.
    out = xp.empty((images.shape[0], 2, *images.shape[1:]), dtype=images.dtype)
    o = out[:, 0]  # along rows
    xp.subtract(images[:, 2:], images[:, :-2], out=o[:, 1:-1])
    o[:, 1:-1] /= 2.0
    xp.subtract(images[:, 1], images[:, 0], out=o[:, 0])
    xp.subtract(images[:, -1], images[:, -2], out=o[:, -1])
    o = out[:, 1]  # along columns
    xp.subtract(images[:, :, 2:], images[:, :, :-2], out=o[:, :, 1:-1])
    o[:, :, 1:-1] /= 2.0
    xp.subtract(images[:, :, 1], images[:, :, 0], out=o[:, :, 0])
    xp.subtract(images[:, :, -1], images[:, :, -2], out=o[:, :, -1])
    return out


def downsample(be, images):
    """Halve a batch (..., H, W) by 2 x 2 block means (odd sizes padded by edge replication)."""
    xp = be.xp
    h, w = images.shape[-2:]
    ph, pw = h % 2, w % 2
    if ph or pw:
        pad = [(0, 0)] * (images.ndim - 2) + [(0, ph), (0, pw)]
        images = xp.pad(images, pad, mode="edge")
    h2, w2 = images.shape[-2] // 2, images.shape[-1] // 2
    lead = images.shape[:-2]
    blocks = images.reshape(*lead, h2, 2, w2, 2)
    return blocks.mean(axis=(-3, -1))


def resample(be, images, shape):
    """Bilinear upsampling of a batch (B, h, w) onto (B, H, W), pixel areas aligned.

    Coarse pixel ``k`` covers fine pixels ``[k * s, (k + 1) * s)`` with ``s = H / h``, so fine
    pixel ``i`` sits at coarse coordinate ``(i + 0.5) / s - 0.5`` (clamped to the frame).
    Requires ``H >= h`` and ``W >= w``.
    """
    xp = be.xp
    b, h, w = images.shape
    big_h, big_w = int(shape[0]), int(shape[1])
    if big_h < h or big_w < w:
        raise ValueError(f"resample only enlarges; got {(h, w)} -> {(big_h, big_w)}")
    dt = images.dtype
    rr = xp.clip((xp.arange(big_h, dtype=dt) + 0.5) * (h / big_h) - 0.5, 0, h - 1)
    cc = xp.clip((xp.arange(big_w, dtype=dt) + 0.5) * (w / big_w) - 0.5, 0, w - 1)
    # Place the coarse images in the corner of a fine-sized array so bilinear() can sample
    # them with a displacement from the fine grid to the coarse coordinates.
    src = xp.zeros((b, big_h, big_w), dtype=dt)
    src[:, :h, :w] = images
    gr, gc = _grid(be, big_h, big_w, dt)
    disp = xp.empty((b, 2, big_h, big_w), dtype=dt)
    disp[:, 0] = rr[:, None] - gr
    disp[:, 1] = cc[None, :] - gc
    return bilinear(be, src[None], disp)[0]
