"""Nion Swift readers, lazy frame sources and sidpy adapters, on hand-made files.

The files here are written by this module in Nion Swift's *library* layout (the properties
with ``dimensional_calibrations``, as its project storage writes them): ``.ndata`` is a zip
holding ``data.npy`` + ``metadata.json``, ``.h5`` an HDF5 file with a ``data`` dataset carrying
the properties as a JSON string attribute. They cover what Nion Swift does not write (damaged,
legacy and unsupported items). Files written by Nion Swift's own code, in every layout and
container, are tested at the end of this module (``nion_files``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import h5py
import numpy as np
import pytest

import stemgpu
from stemgpu.io import nion
from stemgpu.io.lazy import LazyStack, npy_member_layout
from stemgpu.io.sidpy_io import from_dataset, to_dataset
from stemgpu.synthetic import simulate_stack

PIXEL_NM = 0.0146  # 14.6 pm


def nion_properties(shape, *, sequence=None, units="nm", scale=PIXEL_NM, exposure=0.25,
                    extra=None):
    """Nion Swift library-layout properties for an image (2-D) or a sequence of images (3-D)."""
    seq = len(shape) == 3 if sequence is None else sequence
    cals = [{"offset": 0.0, "scale": 1.0, "units": ""}] if len(shape) == 3 else []
    cals += [{"offset": -1.5, "scale": scale, "units": units},
             {"offset": 2.0, "scale": scale, "units": units}]
    props = {
        "type": "data_item",
        "uuid": "5b4a7d0c-7c2e-4a8e-9a42-1f2e3d4c5b6a",
        "version": 13,
        "created": "2024-03-05T14:07:31.123456",
        "timezone": "Europe/Vienna",
        "timezone_offset": "+0100",
        "data_shape": list(shape),
        "data_dtype": "float32",
        "is_sequence": seq,
        "collection_dimension_count": 0,
        "datum_dimension_count": 2,
        "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
        "dimensional_calibrations": cals,
        "metadata": {
            "hardware_source": {"hardware_source_id": "superscan",
                                "hardware_source_name": "SuperScan", "exposure": exposure,
                                "pixel_time_us": 2.0, "channel_name": "HAADF"},
            "instrument": {"high_tension": 100000.0, "defocus": 1.5e-9},
        },
        "title": "HAADF sequence",
    }
    props.update(extra or {})
    return props


def write_ndata(path, data, props, *, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    np.save(buf, data)
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("metadata.json", json.dumps(props))
        zf.writestr("data.npy", buf.getvalue())
    return str(path)


def write_nion_h5(path, data, props):
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("data", data=data)
        dset.attrs["properties"] = json.dumps(props)
    return str(path)


@pytest.fixture(scope="module")
def stack():
    data, truth = simulate_stack((5, 48, 40), frame_jitter_px=1.5, seed=3)
    return data, truth


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", ["ndata", "ndata-deflated", "h5"])
def test_sequence_roundtrip_values_and_calibration(tmp_path, stack, fmt):
    data, _ = stack
    props = nion_properties(data.shape)
    if fmt == "h5":
        path = write_nion_h5(tmp_path / "seq.h5", data, props)
    else:
        comp = zipfile.ZIP_DEFLATED if fmt.endswith("deflated") else zipfile.ZIP_STORED
        path = write_ndata(tmp_path / "seq.ndata", data, props, compression=comp)
    before = sha(path)
    ds = stemgpu.open(path)
    assert ds.shape == data.shape
    assert ds.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(ds.compute()), data)
    assert [ds._axes[i].dimension_type.name for i in range(3)] == [
        "TEMPORAL", "SPATIAL", "SPATIAL"]
    assert ds._axes[1].units == ds._axes[2].units == "nm"
    # frame axis in seconds from hardware_source exposure (0.25 s)
    np.testing.assert_allclose(ds._axes[0].values, np.arange(5) * 0.25)
    assert ds._axes[0].units == "s"
    # spatial calibration: scale 0.0146 nm and the file's offsets, in nm
    np.testing.assert_allclose(ds._axes[1].values, -1.5 + np.arange(48) * PIXEL_NM, atol=1e-12)
    np.testing.assert_allclose(ds._axes[2].values, 2.0 + np.arange(40) * PIXEL_NM, atol=1e-12)
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, abs=1e-9)
    assert stemgpu._inputs.pixel_size_from_dataset(ds) == pytest.approx(14.6, rel=1e-9)
    assert ds.metadata["created"] == "2024-03-05T14:07:31.123456"
    assert ds.metadata["timezone"] == "Europe/Vienna"
    assert ds.metadata["exposure_s"] == 0.25
    assert ds.metadata["frame_time_s"] == 0.25
    assert ds.metadata["hardware_source"] == "SuperScan"
    assert ds.original_metadata == props  # every original key kept
    assert ds.units == "counts"
    assert sha(path) == before  # reading never modifies the file
    expected_kind = {"ndata": "memmap", "ndata-deflated": "zip-compressed", "h5": "hdf5"}
    assert ds.metadata["source"]["storage"] == expected_kind[fmt]


def test_ndata_is_memory_mapped_at_member_offset(tmp_path, stack):
    data, _ = stack
    path = write_ndata(tmp_path / "seq.ndata", data, nion_properties(data.shape))
    offset, shape, dtype, fortran = npy_member_layout(path)
    assert (shape, dtype, fortran) == (data.shape, np.dtype("float32"), False)
    raw = open(path, "rb").read()
    assert raw[offset:offset + data.nbytes] == data.tobytes()
    src = nion.open_frames(path)
    assert src.kind == "memmap"
    assert src.pixel_size_pm == pytest.approx(14.6)


def test_lazy_dataset_does_not_read_until_computed(tmp_path, stack, monkeypatch):
    data, _ = stack
    path = write_nion_h5(tmp_path / "seq.h5", data, nion_properties(data.shape))
    reads = []
    original = LazyStack.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(LazyStack, "__getitem__", spy)
    ds = nion.read_nion(path, lazy=True)
    assert reads == []
    np.testing.assert_array_equal(np.asarray(ds[2:4].compute()), data[2:4])
    assert reads  # frames were read on demand
    eager = nion.read_nion(path, lazy=False)
    np.testing.assert_array_equal(np.asarray(eager.compute()), data)


def test_h5_opened_read_only(tmp_path, stack, monkeypatch):
    data, _ = stack
    path = write_nion_h5(tmp_path / "seq.h5", data, nion_properties(data.shape))
    modes = []
    real_file = h5py.File

    def spy(name, mode="r", *args, **kwargs):
        modes.append(mode)
        return real_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", spy)
    ds = stemgpu.open(path)
    ds.compute()
    src = nion.open_frames(path)
    src[0]
    src.close()
    assert modes and set(modes) == {"r"}


def test_image_and_units(tmp_path, stack):
    data, _ = stack
    img = data[0]
    props = nion_properties(img.shape, units="Å", scale=0.146)
    ds = stemgpu.open(write_ndata(tmp_path / "img.ndata", img, props))
    assert ds.shape == img.shape
    assert [ds._axes[i].dimension_type.name for i in range(2)] == ["SPATIAL", "SPATIAL"]
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, abs=1e-9)
    assert ds._axes[0].units == "nm"
    np.testing.assert_allclose(ds._axes[0].values[:2], [-0.15, -0.15 + 0.0146], atol=1e-12)
    props = nion_properties(img.shape, units="µm", scale=1.46e-5)
    ds = stemgpu.open(write_nion_h5(tmp_path / "img.h5", img, props))
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, rel=1e-9)


def test_frame_time_from_sequence_calibration_and_pixel_time(tmp_path, stack):
    data, _ = stack
    props = nion_properties(data.shape)
    props["dimensional_calibrations"][0] = {"offset": 0.0, "scale": 400.0, "units": "ms"}
    ds = stemgpu.open(write_ndata(tmp_path / "a.ndata", data, props))
    assert ds.metadata["frame_time_s"] == pytest.approx(0.4)
    props = nion_properties(data.shape)
    del props["metadata"]["hardware_source"]["exposure"]
    ds = stemgpu.open(write_ndata(tmp_path / "b.ndata", data, props))
    assert ds.metadata["frame_time_s"] == pytest.approx(2e-6 * 48 * 40)
    props = nion_properties(data.shape)
    props["metadata"] = {}
    ds = stemgpu.open(write_ndata(tmp_path / "c.ndata", data, props))
    assert "frame_time_s" not in ds.metadata
    assert ds._axes[0].units == "frame"


def test_pixel_size_keyword_overrides_and_replaces_missing(tmp_path, stack):
    data, _ = stack
    props = nion_properties(data.shape, units="", scale=1.0)
    path = write_ndata(tmp_path / "uncal.ndata", data, props)
    with pytest.raises(ValueError, match=r"uncal\.ndata.*missing spatial calibration.*"
                                         r"pixel_size="):
        stemgpu.open(path)
    ds = stemgpu.open(path, pixel_size=20.0)
    assert ds.metadata["pixel_size_pm"] == 20.0
    assert ds.metadata["pixel_size_source"] == "pixel_size="
    cal = write_ndata(tmp_path / "cal.ndata", data, nion_properties(data.shape))
    assert stemgpu.open(cal, pixel_size=15.0).metadata["pixel_size_pm"] == 15.0
    with pytest.raises(ValueError, match="pixel_size must be a finite number > 0; got -1"):
        stemgpu.open(cal, pixel_size=-1)


def test_public_functions_take_calibration_from_nion_dataset(tmp_path, stack):
    data, _ = stack
    ds = stemgpu.open(write_ndata(tmp_path / "seq.ndata", data, nion_properties(data.shape)))
    res = stemgpu.register_rigid(ds, backend="numpy")
    assert res.pixel_size_pm == pytest.approx(14.6)
    plain = stemgpu.register_rigid(data, backend="numpy")
    assert plain.pixel_size_pm is None
    np.testing.assert_array_equal(res.shifts, plain.shifts)  # same pixels, same answer


# ------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.ndata.*no such file"):
        stemgpu.open(tmp_path / "nothere.ndata")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike; got int"):
        stemgpu.open(3)


def test_not_a_nion_file(tmp_path):
    txt = tmp_path / "notes.ndata"
    txt.write_text("hello")
    with pytest.raises(nion.NionFormatError, match=r"notes\.ndata.*not a Nion file"):
        stemgpu.open(txt)
    other = tmp_path / "other.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match=r"other\.txt.*not a Nion file"):
        stemgpu.open(other)
    zpath = tmp_path / "wrong.ndata"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(ValueError, match=r"wrong\.ndata.*lacks data\.npy"):
        stemgpu.open(zpath)
    hpath = tmp_path / "plain.h5"
    with h5py.File(hpath, "w") as fh:
        fh["image"] = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"plain\.h5.*not a Nion file.*'image'"):
        stemgpu.open(hpath)
    bad_json = tmp_path / "badjson.h5"
    with h5py.File(bad_json, "w") as fh:
        fh["data"] = np.zeros((4, 4))
        fh["data"].attrs["properties"] = "{not json"
    with pytest.raises(ValueError, match=r"badjson\.h5.*not valid JSON"):
        stemgpu.open(bad_json)


def test_truncated_zip(tmp_path, stack):
    data, _ = stack
    path = write_ndata(tmp_path / "cut.ndata", data, nion_properties(data.shape))
    raw = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.ndata.*truncated or corrupt zip"):
        stemgpu.open(path)
    h5path = write_nion_h5(tmp_path / "cut.h5", data, nion_properties(data.shape))
    raw = open(h5path, "rb").read()
    with open(h5path, "wb") as fh:
        fh.write(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=r"cut\.h5.*truncated or corrupt HDF5"):
        stemgpu.open(h5path)


@pytest.mark.parametrize("case", ["4d", "spectrum", "rgb", "mismatch", "complex"])
def test_unsupported_dimensionality(tmp_path, case):
    if case == "4d":
        data = np.zeros((3, 4, 5, 6), np.float32)
        props = nion_properties((5, 6), extra={"collection_dimension_count": 2,
                                               "is_sequence": False})
        props["dimensional_calibrations"] = [{"scale": 1, "units": "nm"}] * 4
        msg = r"4d\.ndata.*unsupported dimensionality.*4-D STEM"
    elif case == "spectrum":
        data = np.zeros(100, np.float32)
        props = nion_properties((100,), sequence=False, extra={"datum_dimension_count": 1})
        props["dimensional_calibrations"] = [{"scale": 1, "units": "eV"}]
        msg = r"spectrum\.ndata.*unsupported dimensionality.*spectra"
    elif case == "rgb":
        data = np.zeros((8, 8, 3), np.uint8)
        props = nion_properties((8, 8), sequence=False)
        msg = r"rgb\.ndata.*unsupported dimensionality.*RGB"
    elif case == "mismatch":
        data = np.zeros((8, 8), np.float32)
        props = nion_properties((2, 8, 8), sequence=True)
        msg = r"mismatch\.ndata.*descriptor does not match"
    else:
        data = np.zeros((8, 8), np.complex64)
        props = nion_properties((8, 8))
        msg = r"complex\.ndata.*unsupported data type complex64"
    path = write_ndata(tmp_path / f"{case}.ndata", data, props)
    with pytest.raises(ValueError, match=msg):
        stemgpu.open(path)


def test_non_square_pixels(tmp_path, stack):
    data, _ = stack
    props = nion_properties(data.shape)
    props["dimensional_calibrations"][2]["scale"] = 0.02
    with pytest.raises(ValueError, match=r"sq\.ndata.*non-square pixels"):
        stemgpu.open(write_ndata(tmp_path / "sq.ndata", data, props))


# ------------------------------------------------------------------------------- lazy source


@pytest.mark.parametrize("fmt", ["memmap", "h5", "deflated"])
def test_lazy_stack_indexing_matches_numpy(tmp_path, stack, fmt):
    data, _ = stack
    props = nion_properties(data.shape)
    if fmt == "h5":
        src = nion.open_frames(write_nion_h5(tmp_path / "s.h5", data, props))
    else:
        comp = zipfile.ZIP_DEFLATED if fmt == "deflated" else zipfile.ZIP_STORED
        src = nion.open_frames(write_ndata(tmp_path / "s.ndata", data, props,
                                            compression=comp))
    with src:
        assert src.shape == data.shape and len(src) == 5 and src.dtype == np.float32
        for key in [1, -1, slice(1, 4), slice(None, None, 2), slice(4, 0, -2),
                    (slice(0, 2), slice(3, 9), 5), (2, 7), [3, 0, 3], np.array([4, 1]),
                    np.array([True, False, True, False, True]), ..., (Ellipsis, 0)]:
            got = src[key]
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, data[key], err_msg=str(key))
        batches = list(src.iter_batches(2))
        assert [b.shape[0] for b in batches] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(batches), data)
        np.testing.assert_array_equal(np.asarray(src), data)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
            next(src.iter_batches(0))


def test_lazy_view_does_not_alias_memmap(tmp_path, stack):
    data, _ = stack
    src = nion.open_frames(write_ndata(tmp_path / "s.ndata", data,
                                        nion_properties(data.shape)))
    frame = src[0]
    frame[:] = -1  # must not touch the read-only map
    np.testing.assert_array_equal(src[0], data[0])


# ------------------------------------------------------------------------------- sidpy adapters


def test_to_dataset_from_dataset_calibration_both_ways(stack):
    data, _ = stack
    ds = to_dataset(data, pixel_size=14.6, frame_time_s=0.5, title="x")
    assert ds.data_type.name == "IMAGE_STACK"
    assert ds._axes[0].dimension_type.name == "TEMPORAL" and ds._axes[0].units == "s"
    cal = from_dataset(ds, backend="numpy")
    assert cal.pixel_size_pm == pytest.approx(14.6, rel=1e-12)
    np.testing.assert_array_equal(cal.data, data)
    img = to_dataset(data[0])
    assert img.data_type.name == "IMAGE" and img._axes[0].units == "pixel"
    assert from_dataset(img).pixel_size_pm is None
    with pytest.raises(ValueError, match=r"array must be a 2-D image .* got shape \(3,\)"):
        to_dataset(np.zeros(3))
    with pytest.raises(ValueError, match="pixel_size must be a finite number > 0; got 0"):
        to_dataset(data, pixel_size=0)
    with pytest.raises(ValueError, match="frame_time_s must be a finite number > 0; got -1"):
        to_dataset(data, frame_time_s=-1)
    with pytest.raises(TypeError, match="dataset must be a sidpy.Dataset; got ndarray"):
        from_dataset(data)


def test_legacy_item_without_descriptor(tmp_path, stack):
    data, _ = stack
    props = nion_properties(data.shape)
    for key in ("is_sequence", "collection_dimension_count", "datum_dimension_count"):
        del props[key]
    ds = stemgpu.open(write_ndata(tmp_path / "legacy.ndata", data, props))
    assert ds.shape == data.shape and ds._axes[0].dimension_type.name == "TEMPORAL"
    props["dimensional_calibrations"][2] = {"offset": 0, "scale": 0.1, "units": "eV"}
    with pytest.raises(ValueError, match=r"legacy_si\.ndata.*unsupported dimensionality.*eV"):
        stemgpu.open(write_ndata(tmp_path / "legacy_si.ndata", data, props))


# ------------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("bad, where", [
    ({"dimensional_calibrations": "nm"}, r"dimensional_calibrations must be a list"),
    ({"dimensional_calibrations": [None, "nm", {}]}, r"dimensional_calibrations\[1\] must be "
                                                     r"a dict"),
    ({"dimensional_calibrations": [{}, {"scale": "0.0146", "units": "nm"}, {}]},
     r"dimensional_calibrations\[1\]\['scale'\] must be a finite number; got '0.0146'"),
    ({"dimensional_calibrations": [{}, {"scale": 0.0146, "units": 3}, {}]},
     r"dimensional_calibrations\[1\]\['units'\] must be a string; got 3"),
    ({"dimensional_calibrations": [{}, {"offset": float("nan"), "scale": 1}, {}]},
     r"\['offset'\] must be a finite number"),
    ({"intensity_calibration": [1, 2]}, r"intensity_calibration must be a dict"),
    ({"collection_dimension_count": "0"}, r"collection_dimension_count must be an integer"),
    ({"datum_dimension_count": -2}, r"datum_dimension_count must be an integer >= 0"),
    ({"is_sequence": "yes"}, r"is_sequence must be true or false"),
])
def test_malformed_properties_raise_nion_format_error(tmp_path, bad, where):
    data = np.zeros((2, 4, 4), np.float32)
    props = {**nion_properties(data.shape), **bad}
    path = write_ndata(tmp_path / "bad.ndata", data, props)
    with pytest.raises(nion.NionFormatError, match=r"bad\.ndata.*malformed .*" + where):
        stemgpu.open(path)
    with pytest.raises(nion.NionFormatError, match=r"bad\.ndata.*malformed"):
        stemgpu.open_frames(path)


def test_non_numeric_metadata_is_ignored_not_fatal(tmp_path):
    data = np.zeros((2, 4, 4), np.float32)
    props = nion_properties(data.shape)
    props["metadata"]["hardware_source"]["exposure"] = "fast"
    ds = stemgpu.open(write_ndata(tmp_path / "m.ndata", data, props))
    assert "exposure_s" not in ds.metadata
    assert ds.metadata["frame_time_s"] == pytest.approx(2e-6 * 16)  # from pixel_time_us


# ------------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("lazy", [True, False])
def test_source_record_and_source_of(tmp_path, stack, lazy):
    data, _ = stack
    props = nion_properties(data.shape)
    path = write_ndata(tmp_path / "seq.ndata", data, props)
    ds = stemgpu.open(path, lazy=lazy)
    record = ds.metadata["source"]
    assert record["path"] == str(tmp_path / "seq.ndata")
    assert record["format"] == "nion-ndata" and record["layout"] == "library"
    assert record["size_bytes"] == len(open(path, "rb").read())
    assert record["sha256"] == (None if lazy else sha(path))  # a lazy open reads no pixels
    src = nion.source_of(ds)
    assert src["sha256"] == sha(path) and "changed_since_open" not in src
    assert src["original_metadata"] == props
    assert ds.metadata["source"]["sha256"] == sha(path)  # computed once, kept
    frames = stemgpu.open_frames(path)
    assert nion.source_of(frames, checksum=False)["sha256"] is None
    assert frames.original_metadata == props
    with open(path, "ab") as fh:  # the file changes after it was opened
        fh.write(b"\0")
    assert nion.source_of(frames)["changed_since_open"] is True
    assert nion.source_of(np.zeros(3)) is None
    assert nion.source_of(to_dataset(data)) is None


# ------------------------------------------------------------------------------- Nion Swift's files
#
# Every file below is written by Nion Swift's own code (tests/nion_files.py): its project
# storage, its storage handlers, its File > Export writers and nionswift-io's TIFF exporter.

@pytest.fixture(scope="module")
def nf():
    pytest.importorskip("nion.swift.model.DataItem",
                        reason="nionswift is not installed (pip install nionswift)")
    import nion_files  # tests/ is on sys.path (pytest's rootdir-relative import)

    return nion_files


@pytest.fixture(scope="module")
def swift_stack():
    rng = np.random.default_rng(17)
    return rng.normal(100.0, 10.0, size=(4, 24, 20)).astype(np.float32)


def check_nion_dataset(ds, data, nf, *, frame_axis=True, exact_metadata=True):
    """Values, 14.6 pm, origin, frame axis, metadata and timestamp of a Nion Swift file."""
    np.testing.assert_array_equal(np.asarray(ds.compute()), data)
    assert ds.dtype == data.dtype
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, abs=1e-9)
    assert stemgpu._inputs.pixel_size_from_dataset(ds) == pytest.approx(14.6, rel=1e-9)
    y, x = ds._axes[ds.ndim - 2], ds._axes[ds.ndim - 1]
    assert y.units == x.units == "nm"
    np.testing.assert_allclose(y.values, nf.ORIGIN_NM[0] + np.arange(data.shape[-2])
                               * nf.PIXEL_NM, atol=1e-12)
    np.testing.assert_allclose(x.values, nf.ORIGIN_NM[1] + np.arange(data.shape[-1])
                               * nf.PIXEL_NM, atol=1e-12)
    if data.ndim == 3:
        assert ds._axes[0].dimension_type.name == "TEMPORAL"
        if frame_axis:
            assert ds._axes[0].units == "s"
            np.testing.assert_allclose(ds._axes[0].values, np.arange(len(data)) * nf.FRAME_S)
            assert ds.metadata["frame_time_s"] == nf.FRAME_S
            assert ds.metadata["frame_time_source"] == "sequence calibration"
    assert ds.metadata["created"] == nf.CREATED_UTC.isoformat()
    assert ds.metadata["exposure_s"] == 0.25
    assert ds.metadata["hardware_source"] == "SuperScan"
    assert ds.units == "counts"
    if exact_metadata:
        assert ds.metadata["timezone"] == nf.TIMEZONE
        assert ds.metadata["timezone_offset"] == nf.TIMEZONE_OFFSET
        assert ds.original_metadata["metadata"] == nf.METADATA
    else:  # the TIFF export keeps only hardware_source
        assert ds.original_metadata["properties"] == nf.METADATA["hardware_source"]


@pytest.mark.parametrize("kind", ["ndata", "h5"])
@pytest.mark.parametrize("frames", [True, False])
def test_nion_swift_library_items(tmp_path, nf, swift_stack, kind, frames):
    data = swift_stack if frames else swift_stack[0]
    path = nf.library_items(tmp_path, data)[kind]
    before = sha(path)
    ds = stemgpu.open(path)
    check_nion_dataset(ds, data, nf)
    assert ds.metadata["source"]["format"] == f"nion-{kind}"
    assert ds.metadata["source"]["layout"] == "library"
    assert ds.title == ("HAADF sequence" if frames else "HAADF")
    src = stemgpu.open_frames(path)
    with src:
        np.testing.assert_array_equal(src[1:3], data[1:3])
        assert src.pixel_size_pm == pytest.approx(14.6)
    assert sha(path) == before


@pytest.mark.parametrize("suffix", [".ndata", ".h5"])
def test_nion_swift_storage_handlers(tmp_path, nf, swift_stack, suffix):
    path = nf.storage_handler_file(tmp_path / f"item{suffix}", swift_stack)
    check_nion_dataset(stemgpu.open(path), swift_stack, nf)


@pytest.mark.parametrize("name", ["export.ndata1", "renamed.ndata"])
@pytest.mark.parametrize("frames", [True, False])
def test_nion_swift_ndata1_export(tmp_path, nf, swift_stack, name, frames):
    data = swift_stack if frames else swift_stack[0]
    written = nf.export(tmp_path, data, "export.ndata1")
    path = str(tmp_path / name)
    if name != "export.ndata1":
        os.rename(written, path)  # the layout is read from the content, not the name
    props = json.loads(zipfile.ZipFile(path).read("metadata.json"))
    assert "spatial_calibrations" in props and "dimensional_calibrations" not in props
    ds = stemgpu.open(path)
    check_nion_dataset(ds, data, nf)
    assert ds.metadata["source"]["format"] == "nion-ndata1"
    assert ds.metadata["created_from"] == "datetime_original"
    assert ds.original_metadata == props
    with stemgpu.open_frames(path) as src:
        assert src.kind == "memmap"
        np.testing.assert_array_equal(src[-1], data[-1])


@pytest.mark.parametrize("frames", [True, False])
def test_nion_swift_nhdf_export(tmp_path, nf, swift_stack, frames):
    data = swift_stack if frames else swift_stack[0]
    path = nf.export(tmp_path, data, "export.nhdf")
    ds = stemgpu.open(path)
    check_nion_dataset(ds, data, nf)
    assert ds.metadata["source"]["format"] == "nion-nhdf"
    assert ds.metadata["source"]["item"] == "data/0"
    assert ds.metadata["source"]["items_in_file"] == 1
    with stemgpu.open_frames(path) as src:
        np.testing.assert_array_equal(src[0], data[0])


@pytest.mark.parametrize("frames", [True, False])
def test_nion_swift_tiff_export(tmp_path, nf, swift_stack, frames):
    pytest.importorskip("nionswift_plugin.TIFF_IO", reason="nionswift-io is not installed")
    data = swift_stack if frames else swift_stack[0]
    path = nf.export_tiff(tmp_path / "export.tif", data)
    ds = stemgpu.open(path)
    check_nion_dataset(ds, data, nf, exact_metadata=False)
    assert ds.metadata["source"]["format"] == "nion-tiff"
    assert ds.metadata["source"]["storage"] == "tiff"
    assert ds.metadata["created_from"] == "timestamp"
    with stemgpu.open_frames(path) as src:
        assert src.kind == "memmap"
        np.testing.assert_array_equal(src[:], data)


def test_nion_swift_h5_held_open_by_another_process(tmp_path, nf, swift_stack):
    with nf.hold_open_h5(tmp_path, swift_stack) as path:
        with pytest.raises(OSError, match="unable to lock file"):
            h5py.File(path, "r")  # the HDF5 lock the running Nion Swift holds
        ds = stemgpu.open(path)
        check_nion_dataset(ds, swift_stack, nf)
        with stemgpu.open_frames(path) as src:
            np.testing.assert_array_equal(src[2], swift_stack[2])
        eager = stemgpu.open(path, lazy=False)
        np.testing.assert_array_equal(np.asarray(eager.compute()), swift_stack)


def test_nion_swift_h5_mid_write(tmp_path, nf):
    from nion.swift.model import HDF5Handler

    # Nion Swift writes an item's properties before its data: caught in between
    path = tmp_path / "midwrite.h5"
    handler = HDF5Handler.HDF5Handler(path)
    try:
        handler.write_properties(nf.data_item(np.zeros((4, 4), np.float32)).write_to_dict(),
                                 nf.CREATED_UTC)
        with pytest.raises(nion.NionFormatError,
                           match=r"midwrite\.h5.*holds no data yet.*mid-write.*read it again"):
            stemgpu.open(path)
    finally:
        handler.close()


def test_nionswift_usim_acquisition(tmp_path, nf):
    pytest.importorskip("nion.usim_device", reason="nionswift-usim is not installed")
    files = nf.usim_acquisition(tmp_path, frames=3, size=32)
    acquired = np.load(files["acquired"])
    assert acquired.shape == (3, 32, 32)
    (_, _, frame_units), (y0, ys, yu), (x0, xs, xu) = files["calibrations"]
    assert (yu, xu) == ("nm", "nm") and ys == xs == pytest.approx(0.0146)
    for kind in ("ndata", "h5"):  # the joined sequence (Nion's join keeps no metadata)
        ds = stemgpu.open(files[kind])
        np.testing.assert_array_equal(np.asarray(ds.compute()), acquired)
        assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, rel=1e-9)
        np.testing.assert_allclose(ds._axes[1].values, y0 + np.arange(32) * ys, atol=1e-12)
        np.testing.assert_allclose(ds._axes[2].values, x0 + np.arange(32) * xs, atol=1e-12)
        assert ds._axes[0].dimension_type.name == "TEMPORAL"
        assert ds._axes[0].units == "frame" and frame_units == ""  # no frame time recorded
        assert ds.metadata["source"]["format"] == f"nion-{kind}"
        res = stemgpu.register_rigid(stemgpu.open_frames(files[kind]), backend="numpy")
        assert res.pixel_size_pm == pytest.approx(14.6)
    image = stemgpu.open(files["image_ndata"])  # one acquired frame with its metadata
    np.testing.assert_array_equal(np.asarray(image.compute()), np.load(files["image"]))
    assert image.metadata["pixel_size_pm"] == pytest.approx(14.6, rel=1e-9)
    hw = files["hardware_source"]
    assert image.metadata["hardware_source"] == hw["hardware_source_name"] == "uSim Scan"
    assert image.metadata["exposure_s"] == hw["exposure"]
    assert image.metadata["pixel_time_us"] == hw["pixel_time_us"]
    assert image.metadata["created"] == files["image_created"]
    assert image.original_metadata["metadata"]["hardware_source"] == hw
