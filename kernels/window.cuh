// Window access straight from the image (no (N, k, k) copy).
//
// A window is the k x k block of frame `frame` of a C-contiguous (n_frames, height, width)
// stack whose [0, 0] pixel sits at image (row0, col0). Pixels are read in place through a
// pointer to that corner and the image row stride.
#pragma once
#include "common.cuh"

namespace stemgpu {

template <typename TI>
struct Window {
    const TI* corner;     // &image[frame, row0, col0]
    long long stride;     // image width (elements between rows)
    int k;                // window side (px)
    SG_HD TI at(int i, int j) const { return corner[(long long)i * stride + j]; }
};

// Bounds check + pointer to the window; returns false when the window does not lie fully
// inside the stack (the fit then gets status OUT_OF_BOUNDS without running).
template <typename TI>
SG_HD bool make_window(const TI* image, int n_frames, int height, int width, int frame,
                       int row0, int col0, int k, Window<TI>* w) {
    if (frame < 0 || frame >= n_frames || row0 < 0 || col0 < 0 || row0 + k > height ||
        col0 + k > width || k < 1) {
        return false;
    }
    w->corner = image + ((long long)frame * height + row0) * (long long)width + col0;
    w->stride = width;
    w->k = k;
    return true;
}

}  // namespace stemgpu
