"""Other microscopes' files through RosettaSciIO: the same calibrated Dataset as a Nion file.

Which writer made each file:

- HSPY, EMD (Berkeley/NCEM) and plain TIFF: RosettaSciIO's own writers;
- DM3 and DM4: Nion Swift's DigitalMicrograph exporter (``nionswift-io``), and the reference
  DM3/DM4 files that ``nionswift-io`` ships with its tests;
- TIA ``.ser``/``.emi`` and Velox EMD: real instrument files, the examples HyperSpy 1.7.6
  published in its wheel, fetched from the package index into a cache outside the repository by
  ``python tests/instrument_files.py`` (the tests skip, naming that command, without them), and
  checked against openNCEM's independent readers (``ncempy``); a TIA image of a simulated scene
  is written by ``tests/tia_files.py`` (no TIA writer exists on the index), checked by both
  readers first, and analysed by ``stemgpu run``;
- a DM4 stack of a simulated scene: Nion Swift's exporter, analysed by ``stemgpu run``.
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


# ---------------------------------------------------------------- real TIA and Velox files


@pytest.fixture(scope="module")
def hyperspy_io():
    import instrument_files

    root = instrument_files.hyperspy_io()
    if root is None:
        pytest.skip("the TIA / Velox example files are not fetched: run "
                    "`python tests/instrument_files.py` (HyperSpy 1.7.6's wheel, from the index)")
    return root


def _ncem_ser(path, scratch):
    """openNCEM's reading of a .ser: (is an image series, data, pixel m, origin (y, x) m).

    Read from a copy without its .emi: openNCEM's .emi parser fails on some of these files,
    and the values and calibration are all in the .ser.
    """
    import shutil

    ser = pytest.importorskip("ncempy.io.ser", reason="ncempy (openNCEM) is not installed")
    path = shutil.copy(path, scratch)
    with ser.fileSER(path) as f:
        images = f.head["DataTypeID"] == 0x4122
    if not images:
        return False, None, None, None
    d = ser.serReader(path)
    return True, d["data"], float(d["pixelSize"][0]), (d["pixelOrigin"][1], d["pixelOrigin"][0])


def test_real_tia_files_match_an_independent_reader(hyperspy_io, tmp_path):
    """Every TIA series HyperSpy published: values, pixel size and origin as openNCEM reads
    them; spectra and diffraction patterns refused with the reason."""
    files = sorted(glob.glob(str(hyperspy_io / "FEI_*" / "*.ser")))
    assert len(files) >= 20
    kinds = {"image": 0, "spectra": 0, "diffraction": 0}
    for path in files:
        is_image, data, pixel_m, origin_m = _ncem_ser(path, tmp_path)
        if not is_image:
            with pytest.raises(formats.FormatError, match="no image or image stack"):
                stemgpu.open(path)
            kinds["spectra"] += 1
            continue
        if pixel_m > 1e-3:  # diffraction: TIA's 1/m calibration read without units
            # (a 4-D scan of patterns is no image at all; a single pattern is refused by size)
            with pytest.raises(formats.FormatError,
                               match="not a real-space pixel|no image or image stack"):
                stemgpu.open(path)
            kinds["diffraction"] += 1
            continue
        ds = stemgpu.open(path, lazy=False)
        np.testing.assert_array_equal(np.asarray(ds.compute()), data)
        assert ds.metadata["pixel_size_pm"] == pytest.approx(pixel_m * 1e12, rel=1e-12)
        y, x = (ds._axes[i] for i in range(ds.ndim - 2, ds.ndim))
        assert (y.units, x.units) == ("nm", "nm")
        assert y.values[0] == pytest.approx(origin_m[0] * 1e9, rel=1e-9, abs=1e-12)
        assert x.values[0] == pytest.approx(origin_m[1] * 1e9, rel=1e-9, abs=1e-12)
        assert ds.metadata["source"]["format"] == "rsciio-tia"
        kinds["image"] += 1
    assert kinds["image"] >= 10 and kinds["spectra"] >= 5 and kinds["diffraction"] >= 2


def test_real_tia_emi_metadata(hyperspy_io):
    """Through the .emi: the acquisition date, the frame time of a STEM series, and a
    diffraction pattern refused by its 1/length units."""
    scan = stemgpu.open(hyperspy_io / "FEI_old" / "03_Scanning Preview.emi")
    assert scan.shape == (5, 128, 128)
    assert scan.metadata["pixel_size_pm"] == pytest.approx(384.352487513925)
    assert scan.metadata["created"] == "2019-04-25T09:30:09"
    assert scan.metadata["frame_time_s"] == pytest.approx(0.23593)
    assert scan.metadata["frame_time_source"] == "TIA ObjectInfo.AcquireInfo.FrameTime"
    tem = stemgpu.open(hyperspy_io / "FEI_old" / "64x64_TEM_images_acquire.emi")
    assert tem.metadata["created"] == "2016-02-21T17:50:18"
    with pytest.raises(formats.FormatError, match="no image or image stack.*1 / nm"):
        stemgpu.open(hyperspy_io / "FEI_old" / "64x64_diffraction_acquire.emi")


def test_real_tia_stem_series_through_stemgpu_run(hyperspy_io, tmp_path, capsys):
    """A real STEM series (TIA, 5 x 128^2 at 384 pm) through `stemgpu run`: drift in pm from
    the file's calibration, the frame time from the .emi."""
    from stemgpu.app.cli import main

    src = hyperspy_io / "FEI_old" / "03_Scanning Preview.emi"
    out = tmp_path / "scan.h5"
    assert main(["run", str(src), "--steps", "rigid", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(5, 128, 128) at 384.352 pm/px" in text and "jitter std x" in text
    res = stemgpu.load(out)
    assert res.pixel_size_pm == pytest.approx(384.352487513925)
    assert res.drift.frame_time_s == pytest.approx(0.23593)  # drift in pm/s
    assert stemgpu.io.results.read_provenance(out)["source"]["format"] == "rsciio-tia"


def test_real_velox_emd_matches_an_independent_reader(hyperspy_io, tmp_path):
    """Velox EMD images and a TEM stack (Thermo Fisher's own files) as openNCEM reads them."""
    import zipfile

    velox = pytest.importorskip("ncempy.io.emdVelox", reason="ncempy is not installed")
    with zipfile.ZipFile(hyperspy_io / "emd_files" / "fei_emd_files.zip") as zf:
        zf.extract("fei_emd_image.emd", tmp_path)
    for path in (tmp_path / "fei_emd_image.emd",
                 hyperspy_io / "emd_files" / "fei_example_tem_stack.emd"):
        ds = stemgpu.open(path, lazy=False)
        with velox.fileEMDVelox(str(path)) as f:
            data, meta = f.get_dataset(f.list_data[0])
        data = np.moveaxis(data, -1, 0) if data.ndim == 3 else data  # Velox: (y, x, frame)
        np.testing.assert_array_equal(np.asarray(ds.compute()), data)
        assert ds.metadata["pixel_size_pm"] == pytest.approx(meta["pixelSize"][-1] * 1e3,
                                                             rel=1e-6)  # ncempy: nm
        assert ds.metadata["source"]["format"] == "rsciio-emd"
        assert ds.metadata["layout"] == ("stack" if data.ndim == 3 else "image")


# ------------------------------------------------ simulated scenes in instrument formats


@pytest.fixture(scope="module")
def srtio3_image():
    image, _ = stemgpu.simulate_image((192, 192), seed=3)  # 14.6 pm/px, a = 390.5 pm
    return np.rint(image).astype(np.uint16)


def test_tia_image_through_stemgpu_run(srtio3_image, tmp_path):
    """A simulated SrTiO3 image in a TIA .ser (checked by two independent readers) through
    `stemgpu run`: the cell from the file's 14.6 pm calibration."""
    import tia_files
    from rsciio.tia import file_reader

    from stemgpu.app.cli import main

    path = tia_files.write_ser(tmp_path / "haadf_1.ser", srtio3_image, pixel_m=14.6e-12,
                               origin_m=(-1.5e-9, 2.0e-9))
    ours = file_reader(path)[0]
    np.testing.assert_array_equal(np.asarray(ours["data"]), srtio3_image)
    assert ours["axes"][0]["scale"] == pytest.approx(0.0146)
    scratch = tmp_path / "ncem"
    scratch.mkdir()
    is_image, data, pixel_m, origin_m = _ncem_ser(path, scratch)
    assert is_image and pixel_m == pytest.approx(14.6e-12)
    np.testing.assert_array_equal(data, srtio3_image)
    assert origin_m == pytest.approx((-1.5e-9, 2.0e-9))
    ds = stemgpu.open(path)
    assert ds.metadata["pixel_size_pm"] == pytest.approx(14.6)
    assert ds._axes[0].values[0] == pytest.approx(ORIGIN_NM[0])
    out = tmp_path / "res.h5"
    assert main(["run", path, "--steps", "atoms,cells", "--out", str(out), "--quiet"]) == 0
    rows = stemgpu.load(out).summary()
    for name in ("a1_length_pm", "a2_length_pm"):
        assert abs(rows[name].value - 390.5) < 4 * rows[name].uncertainty + 0.5, name


def test_dm4_stack_through_stemgpu_run(tmp_path):
    """A simulated SrTiO3 stack in Nion Swift's DM4 export through `stemgpu run` with every
    default step: the cell from the file's 14.6 pm calibration."""
    pytest.importorskip("nionswift_plugin.DM_IO", reason="nionswift-io is not installed")
    import pathlib

    import nion_files

    from stemgpu.app.cli import main

    stack, _ = stemgpu.simulate_stack((5, 160, 160), frame_jitter_px=0.3, seed=4)
    path = nion_files.export_dm(pathlib.Path(tmp_path / "stack.dm4"), stack.astype(np.float32))
    out = tmp_path / "res.h5"
    assert main(["run", path, "--out", str(out), "--quiet"]) == 0
    res = stemgpu.load(out)
    assert res.pixel_size_pm == pytest.approx(14.6)
    assert stemgpu.io.results.read_provenance(out)["source"]["format"] == \
        "rsciio-digitalmicrograph"
    rows = res.summary()
    for name in ("a1_length_pm", "a2_length_pm"):
        assert abs(rows[name].value - 390.5) < 4 * rows[name].uncertainty + 0.5, name


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
