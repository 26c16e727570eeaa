"""Other microscopes' files through RosettaSciIO: the same calibrated Dataset as a Nion file.

Which writer made each file:

- HSPY, EMD (Berkeley/NCEM) and plain TIFF: RosettaSciIO's own writers;
- DM3 and DM4: Nion Swift's DigitalMicrograph exporter (``nionswift-io``), and the reference
  DM3/DM4 files that ``nionswift-io`` ships with its tests;
- TIA ``.ser`` and Velox EMD: no writer exists in RosettaSciIO and no example file ships in any
  installed package, so those tests look for files and skip with the reason when none exist.
"""

from __future__ import annotations

import glob
import hashlib
import os
import site
import sys

import numpy as np
import pytest

import stemgpu
from stemgpu.io import formats, nion

pytest.importorskip("rsciio", reason="RosettaSciIO is not installed (pip install "
                                     "'stemgpu[formats]')")

PIXEL_NM = 0.0146
ORIGIN_NM = (-1.5, 2.0)
FRAME_S = 0.5


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(5)
    return rng.normal(100.0, 10.0, size=(4, 24, 20)).astype(np.float32)


def signal(data):
    """A RosettaSciIO signal dict (frame axis in s, y/x at 14.6 pm) for its writers."""
    axes = [{"name": "y", "size": data.shape[-2], "scale": PIXEL_NM, "offset": ORIGIN_NM[0],
             "units": "nm", "navigate": False},
            {"name": "x", "size": data.shape[-1], "scale": PIXEL_NM, "offset": ORIGIN_NM[1],
             "units": "nm", "navigate": False}]
    if data.ndim == 3:
        axes.insert(0, {"name": "time", "size": data.shape[0], "scale": FRAME_S, "offset": 0.0,
                        "units": "s", "navigate": True})
    return {"data": data, "axes": axes,
            "metadata": {"General": {"title": "HAADF", "date": "2024-03-05",
                                     "time": "13:07:31", "time_zone": "UTC"},
                         "Signal": {"signal_type": "", "quantity": "Intensity (counts)"}},
            "original_metadata": {"microscope": {"high_tension": 100000.0}},
            "tmp_parameters": {}, "attributes": {"_lazy": False}, "learning_results": {},
            "models": {}, "package_info": {"name": "stemgpu-tests", "version": "0"}}


def write_rsciio(path, data):
    from importlib import import_module

    plugin = formats.EXTENSIONS[os.path.splitext(str(path))[1]][0]
    import_module(f"rsciio.{plugin}").file_writer(str(path), signal(data))
    return str(path)


def check_dataset(ds, data, *, frame_axis=True, origin=True):
    np.testing.assert_array_equal(np.asarray(ds.compute()), data)
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6, abs=1e-9)
    assert stemgpu._inputs.pixel_size_from_dataset(ds) == pytest.approx(14.6, rel=1e-9)
    y, x = ds._axes[ds.ndim - 2], ds._axes[ds.ndim - 1]
    assert [y.dimension_type.name, x.dimension_type.name] == ["SPATIAL", "SPATIAL"]
    assert y.units == x.units == "nm"
    if origin:
        np.testing.assert_allclose(y.values, ORIGIN_NM[0] + np.arange(data.shape[-2])
                                   * PIXEL_NM, atol=1e-9)
        np.testing.assert_allclose(x.values, ORIGIN_NM[1] + np.arange(data.shape[-1])
                                   * PIXEL_NM, atol=1e-9)
    if data.ndim == 3:
        assert ds._axes[0].dimension_type.name == "TEMPORAL"
        if frame_axis:
            assert ds._axes[0].units == "s"
            assert ds.metadata["frame_time_s"] == pytest.approx(FRAME_S)
            np.testing.assert_allclose(ds._axes[0].values, np.arange(len(data)) * FRAME_S)


@pytest.mark.parametrize("ext", [".hspy", ".emd", ".tif"])
@pytest.mark.parametrize("frames", [True, False])
def test_rsciio_written_files(tmp_path, stack, ext, frames):
    data = stack if frames else stack[0]
    path = write_rsciio(tmp_path / f"haadf{ext}", data)
    ds = stemgpu.open(path)
    check_dataset(ds, data)
    plugin = formats.EXTENSIONS[ext][0]
    assert ds.metadata["source"]["format"] == f"rsciio-{plugin}"
    assert ds.metadata["source"]["path"] == path
    assert ds.metadata["layout"] == ("stack" if frames else "image")
    if ext != ".emd":  # the Berkeley EMD writer keeps no date
        assert ds.metadata["created"] == "2024-03-05T13:07:31"
    assert ds.title == ("haadf" if ext == ".tif" else "HAADF")  # TIFF keeps no title
    assert "metadata" in ds.original_metadata and "axes" in ds.original_metadata
    src = nion.source_of(ds)
    assert src["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    eager = stemgpu.open(path, lazy=False)
    np.testing.assert_array_equal(np.asarray(eager.compute()), data)
    assert eager.metadata["source"]["sha256"] == src["sha256"]
    frames_src = stemgpu.open_frames(path)
    assert frames_src.pixel_size_pm == pytest.approx(14.6)
    np.testing.assert_array_equal(frames_src[-1], data[-1])
    np.testing.assert_array_equal(np.asarray(frames_src), data)


@pytest.mark.parametrize("ext", [".dm3", ".dm4"])
@pytest.mark.parametrize("frames", [True, False])
def test_dm_written_by_nion_swift_exporter(tmp_path, stack, ext, frames):
    pytest.importorskip("nionswift_plugin.DM_IO", reason="nionswift-io is not installed")
    import nion_files

    data = stack if frames else stack[0]
    path = nion_files.export_dm(tmp_path / f"haadf{ext}", data)
    ds = stemgpu.open(path)
    check_dataset(ds, data)
    assert ds.metadata["source"]["format"] == "rsciio-digitalmicrograph"
    if frames:  # a DM4 / DM3 stack streams like a Nion stack
        res = stemgpu.register_rigid(stemgpu.open_frames(path), backend="numpy")
        assert res.pixel_size_pm == pytest.approx(14.6)


def _installed(pattern):
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return sorted({p for root in roots for p in glob.glob(os.path.join(root, "**", pattern),
                                                          recursive=True)})


def test_dm_reference_files_shipped_with_nionswift_io():
    files = [p for p in _installed("ref_*_0_2.dm[34]") if "DM_IO" in p]
    if not files:
        pytest.skip("no reference DM files installed (they ship with nionswift-io)")
    for path in files:
        # nionswift-io's reference items: arange data, axes in units "µ", "µn", "µnn"
        # (not lengths), so the pixel size must be given
        with pytest.raises(ValueError, match="no image or image stack.*pass pixel_size="):
            stemgpu.open(path)
        ds = stemgpu.open(path, pixel_size=20.0)
        expected = np.arange(np.prod(ds.shape), dtype=np.float32).reshape(ds.shape)
        np.testing.assert_array_equal(np.asarray(ds.compute()), expected)
        assert ds.metadata["pixel_size_pm"] == 20.0
        assert ds.metadata["pixel_size_source"] == "pixel_size="


@pytest.mark.parametrize("pattern, what", [("*.ser", "TIA .ser"), ("*.emd", "Velox EMD")])
def test_real_instrument_files_if_installed(pattern, what):
    files = _installed(pattern)
    if not files:
        pytest.skip(f"no {what} example file in any installed package (RosettaSciIO ships its "
                    "test data only in its source repository, and has no writer for it)")
    for path in files:
        try:
            ds = stemgpu.open(path)
        except formats.FormatError as exc:  # e.g. spectra only: must say so, not crash
            assert "no image or image stack" in str(exc) or "could not read" in str(exc)
            continue
        assert ds.metadata["pixel_size_pm"] > 0


def test_missing_rsciio_names_the_extra(tmp_path, stack, monkeypatch):
    path = write_rsciio(tmp_path / "haadf.hspy", stack)
    monkeypatch.setitem(sys.modules, "rsciio", None)
    with pytest.raises(ImportError, match=r"haadf\.hspy.*HyperSpy.*RosettaSciIO.*"
                                          r"pip install 'stemgpu\[formats\]'"):
        stemgpu.open(path)
    with pytest.raises(ImportError, match=r"pip install 'stemgpu\[formats\]'"):
        stemgpu.open_frames(path)


def test_bad_files(tmp_path, stack):
    bad = tmp_path / "broken.dm4"
    bad.write_bytes(b"not a dm4 file at all")
    with pytest.raises(formats.FormatError, match=r"broken\.dm4.*could not read it as a Gatan "
                                                  r"DigitalMicrograph file"):
        stemgpu.open(bad)
    other = tmp_path / "image.xyz"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(nion.NionFormatError, match=r"image\.xyz.*not a Nion file"):
        stemgpu.open(other)
    spectrum = write_rsciio(tmp_path / "spectrum.hspy", np.zeros((3, 40), np.float32))
    # a 2-D array whose axes are not both lengths: not an image
    from rsciio.hspy import file_writer

    sig = signal(np.zeros((30, 40), np.float32))
    sig["axes"][0]["units"] = "eV"
    file_writer(spectrum, sig)
    with pytest.raises(formats.FormatError, match=r"spectrum\.hspy.*no image or image stack"):
        stemgpu.open(spectrum)
    with pytest.raises(ValueError, match=r"pixel_size must be a finite number > 0; got 0"):
        stemgpu.open(write_rsciio(tmp_path / "ok.hspy", stack), pixel_size=0)
