"""Write a Thermo Fisher TIA ``.ser`` file of 2-D images for the tests.

No TIA writer exists in RosettaSciIO or elsewhere on the package index, so this writes the
series layout (version 0x0220: 64-bit offsets; 2-D data elements; time tags) from the format's
description. The tests check every file it writes with two independent readers, RosettaSciIO's
and openNCEM's (``ncempy.io.ser``), before stemgpu reads it, so a misunderstanding here shows
as a disagreement there rather than as a passing test.
"""

from __future__ import annotations

import struct

import numpy as np

_DTYPES = {np.dtype("u1"): 1, np.dtype("<u2"): 2, np.dtype("<u4"): 3, np.dtype("i1"): 4,
           np.dtype("<i2"): 5, np.dtype("<i4"): 6, np.dtype("<f4"): 7, np.dtype("<f8"): 8}


def write_ser(path, images, *, pixel_m, origin_m=(0.0, 0.0), times=None):
    """Write ``images`` ((y, x) or (frames, y, x)) as a TIA series with square pixels.

    ``pixel_m``: pixel size in metres (TIA's unit); ``origin_m``: (y, x) calibration offsets
    in metres; ``times``: one integer time stamp (s since 1970) per frame.
    """
    data = np.asarray(images)
    data = data[None] if data.ndim == 2 else data
    dtype = data.dtype.newbyteorder("<") if data.dtype.byteorder == ">" else data.dtype
    if np.dtype(dtype) not in _DTYPES:
        raise TypeError(f"TIA has no data type for {data.dtype}")
    n, h, w = data.shape
    times = np.arange(n) + 1_700_000_000 if times is None else np.asarray(times)
    desc, units = b"Number", b""
    head = struct.pack("<hhh", 0x4949, 0x0197, 0x0220)
    head += struct.pack("<iiii", 0x4122, 0x4152, n, n)
    dims = struct.pack("<i", n) + struct.pack("<dd", 0.0, 1.0) + struct.pack("<i", 0)
    dims += struct.pack("<i", len(desc)) + desc + struct.pack("<i", len(units)) + units
    offset_array = len(head) + 8 + 4 + len(dims)
    elements_at = offset_array + 16 * n
    element = 2 * (8 + 8 + 4) + 2 + 8 + h * w * np.dtype(dtype).itemsize
    tags_at = elements_at + n * element
    data_offsets = [elements_at + i * element for i in range(n)]
    tag_offsets = [tags_at + i * 8 for i in range(n)]
    with open(path, "wb") as f:
        f.write(head + struct.pack("<q", offset_array) + struct.pack("<i", 1) + dims)
        f.write(struct.pack(f"<{n}q", *data_offsets) + struct.pack(f"<{n}q", *tag_offsets))
        for frame in data:
            # x calibration, then y; TIA stores the rows bottom-up.
            f.write(struct.pack("<ddi", origin_m[1], pixel_m, 0))
            f.write(struct.pack("<ddi", origin_m[0], pixel_m, 0))
            f.write(struct.pack("<hii", _DTYPES[np.dtype(dtype)], w, h))
            f.write(np.ascontiguousarray(frame[::-1], dtype=dtype).tobytes())
        for t in times:
            f.write(struct.pack("<hhi", 0x4152, 0, int(t)))
    return str(path)
