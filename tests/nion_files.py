"""Files written by Nion Swift's own code (``nionswift``, ``nionswift-io``), for the reader tests.

Nothing here reimplements a Nion format: every writer calls the installed Nion Swift
packages, the same code the application runs:

- :func:`library_items`: a file-backed project (profile, ``.nsproj``, data folder) opened by
  ``nion.swift.model.Profile``; ``DocumentModel.append_data_item`` stores each item through the
  project's storage system (``NDataHandler`` -> ``.ndata``, ``HDF5Handler`` -> ``.h5`` for
  large-format items), i.e. the "library" layout with ``dimensional_calibrations``;
- :func:`storage_handler_file`: one item written directly through ``NDataHandler`` /
  ``HDF5Handler`` (``write_properties`` + ``write_data``), as the storage system does;
- :func:`export`: File > Export through ``ImportExportManager`` writers ("NData 1" ->
  ``.ndata1``, "NData HDF" -> ``.nhdf``);
- :func:`export_tiff`: the ImageJ TIFF exporter of ``nionswift-io`` (``TIFF_IO``);
- :func:`export_dm`: the DigitalMicrograph exporter of ``nionswift-io`` (``DM_IO``), DM3/DM4;
- :func:`hold_open_h5`: a child process that keeps a project's ``.h5`` item open in append
  mode, as a running Nion Swift does.

Those need ``nionswift`` (and ``nionswift-io`` for TIFF/DM); they import it when called, so
call them after ``pytest.importorskip("nion.swift.model.DataItem")``. One writer needs no Nion
package: :func:`write_library_ndata` builds a minimal library-layout ``.ndata`` by hand, for
tests that only need *a* calibrated Nion file (the CLI tests).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid
import zipfile

import numpy as np

PIXEL_NM = 0.0146  # 14.6 pm
ORIGIN_NM = (-1.5, 2.0)  # (y, x) offsets of pixel (0, 0)
FRAME_S = 0.5
CREATED_UTC = datetime.datetime(2024, 3, 5, 13, 7, 31, 123456)  # Nion stores UTC, naive
TIMEZONE, TIMEZONE_OFFSET = "Europe/Vienna", "+0100"
METADATA = {
    "hardware_source": {"hardware_source_id": "superscan", "hardware_source_name": "SuperScan",
                        "exposure": 0.25, "pixel_time_us": 2.0, "channel_name": "HAADF"},
    "instrument": {"high_tension": 100000.0, "defocus": 1.5e-9},
}


def write_library_ndata(path, data: np.ndarray, pixel_size_nm: float = PIXEL_NM) -> str:
    """A minimal Nion Swift library item (``.ndata``) written by hand, without Nion Swift.

    The zip holds ``data.npy`` and ``metadata.json`` with ``dimensional_calibrations`` (a
    uncalibrated frame axis for a stack, then y and x in nm) and the data descriptor, as
    Nion Swift's ``NDataHandler`` stores an item.
    """
    seq = data.ndim == 3
    props = {
        "type": "data-item", "is_sequence": seq, "collection_dimension_count": 0,
        "datum_dimension_count": 2,
        "dimensional_calibrations": ([{"offset": 0.0, "scale": 1.0, "units": ""}] if seq else [])
        + [{"offset": 0.0, "scale": pixel_size_nm, "units": "nm"}] * 2,
        "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
    }
    buf = io.BytesIO()
    np.save(buf, data)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.npy", buf.getvalue())
        zf.writestr("metadata.json", json.dumps(props))
    return str(path)


def xdata(data: np.ndarray):
    """Nion ``DataAndMetadata`` of an image or a sequence of images, calibrated at 14.6 pm."""
    from nion.data import Calibration, DataAndMetadata

    cals = [Calibration.Calibration(ORIGIN_NM[0], PIXEL_NM, "nm"),
            Calibration.Calibration(ORIGIN_NM[1], PIXEL_NM, "nm")]
    if data.ndim == 3:
        cals.insert(0, Calibration.Calibration(0.0, FRAME_S, "s"))
    return DataAndMetadata.new_data_and_metadata(
        data, intensity_calibration=Calibration.Calibration(0.0, 1.0, "counts"),
        dimensional_calibrations=cals,
        data_descriptor=DataAndMetadata.DataDescriptor(data.ndim == 3, 0, 2),
        metadata=json.loads(json.dumps(METADATA)), timestamp=CREATED_UTC, timezone=TIMEZONE,
        timezone_offset=TIMEZONE_OFFSET)


def data_item(data: np.ndarray, *, large_format: bool | None = None):
    """A Nion Swift ``DataItem`` of :func:`xdata`, created at :data:`CREATED_UTC`."""
    from nion.swift.model import DataItem

    item = DataItem.new_data_item(xdata(data))
    item.title = "HAADF sequence" if data.ndim == 3 else "HAADF"
    item.created = CREATED_UTC  # the item's own creation time, which the exports write
    if large_format is not None:
        item.large_format = large_format
    return item


@contextlib.contextmanager
def project(folder: pathlib.Path):
    """A Nion Swift document model on a file-backed project in ``folder`` (closed on exit)."""
    from nion.swift.model import Cache, FileStorageSystem, Profile

    folder.mkdir(parents=True, exist_ok=True)
    profile_path = folder / "Profile.nsprof"
    project_path = folder / "Project.nsproj"
    profile_path.write_text(json.dumps({"version": FileStorageSystem.PROFILE_VERSION,
                                        "uuid": str(uuid.uuid4())}))
    project_path.write_text(json.dumps({"version": FileStorageSystem.PROJECT_VERSION,
                                        "uuid": str(uuid.uuid4()),
                                        "project_data_folders": ["Data"]}))
    storage = FileStorageSystem.make_file_persistent_storage_system(profile_path)
    storage.load_properties()
    profile = Profile.Profile(storage_system=storage, cache_factory=Cache.DictCacheFactory())
    profile.storage_system = storage
    profile.add_project_index(project_path)
    profile.read_profile()
    reference = profile.project_references[0]
    profile.read_project(reference)
    document_model = reference.document_model
    try:
        with document_model.ref():
            yield document_model
    finally:
        profile.close()


def library_items(folder: pathlib.Path, data: np.ndarray) -> dict[str, str]:
    """Store ``data`` twice in a project: as a ``.ndata`` and as a large-format ``.h5`` item.

    Returns ``{"ndata": path, "h5": path}`` (the files Nion Swift wrote in its data folder).
    """
    paths = {}
    with project(folder) as document_model:
        for kind, large in (("ndata", False), ("h5", True)):
            item = data_item(data, large_format=large)
            document_model.append_data_item(item)
            paths[kind] = item._test_get_file_path()
    for kind, path in paths.items():
        assert path.endswith("." + kind) and os.path.isfile(path), (kind, path)
    return paths


def storage_handler_file(path: pathlib.Path, data: np.ndarray) -> str:
    """One item written through ``NDataHandler`` (``.ndata``) or ``HDF5Handler`` (``.h5``)."""
    from nion.swift.model import HDF5Handler, NDataHandler

    item = data_item(data)
    properties = item.write_to_dict()
    handler_class = HDF5Handler.HDF5Handler if path.suffix == ".h5" else NDataHandler.NDataHandler
    handler = handler_class(path)
    try:
        handler.write_properties(properties, CREATED_UTC)
        handler.write_data(data, CREATED_UTC)
    finally:
        handler.close()
    return str(path)


def export(folder: pathlib.Path, data: np.ndarray, name: str) -> str:
    """File > Export of one item with Nion Swift's writer for ``name``'s extension.

    ``.ndata1`` -> "NData 1" (``NDataImportExportHandler``), ``.nhdf`` -> "NData HDF"
    (``HDFImportExportDriver``).
    """
    from nion.swift.model import ImportExportManager

    writer_id = {".ndata1": "ndata1-io-handler", ".nhdf": "nhdf-io-handler"}[
        pathlib.Path(name).suffix]
    manager = ImportExportManager.ImportExportManager()
    target = folder / name
    with project(folder / "project") as document_model:
        item = data_item(data)
        document_model.append_data_item(item)
        display_item = document_model.get_display_item_for_data_item(item)
        manager.write_display_item_with_writer(manager.get_writer_by_id(writer_id),
                                               display_item, target)
    return str(target)


def export_tiff(path: pathlib.Path, data: np.ndarray) -> str:
    """Nion Swift's "TIFF Files (ImageJ)" export (an ImageJ hyperstack with a ``nion.1`` block)."""
    from nionswift_plugin.TIFF_IO import TIFFIODelegate_ImageJ

    TIFFIODelegate_ImageJ(api=None).write_data_and_metadata_stream(xdata(data), str(path))
    return str(path)


def export_dm(path: pathlib.Path, data: np.ndarray) -> str:
    """Nion Swift's DigitalMicrograph export (``.dm3`` or ``.dm4`` from the suffix)."""
    from nionswift_plugin.DM_IO import dm3_image_utils

    with open(path, "wb") as fh:
        dm3_image_utils.save_image(xdata(data), fh, 4 if path.suffix == ".dm4" else 3)
    return str(path)


_HOLDER = textwrap.dedent("""
    import pathlib, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import nion_files
    data = np.load({npy!r})
    with nion_files.project(pathlib.Path({folder!r})) as document_model:
        item = nion_files.data_item(data, large_format=True)
        document_model.append_data_item(item)
        print(item._test_get_file_path(), flush=True)
        sys.stdin.readline()  # hold the project (and its .h5 item) open until told
""")


@contextlib.contextmanager
def hold_open_h5(folder: pathlib.Path, data: np.ndarray):
    """Yield the path of an ``.h5`` item that another process (Nion Swift's code) holds open.

    The child keeps the project open, so its ``HDF5Handler`` has the item open in append mode
    and holds the HDF5 file lock, as a running Nion Swift does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / "data.npy"
    np.save(npy, data)
    code = _HOLDER.format(tests=os.path.dirname(os.path.abspath(__file__)), npy=str(npy),
                          folder=str(folder / "project"))
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the Nion Swift child process wrote no path (rc {child.wait()})")
        yield line
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=60)


_USIM = textwrap.dedent("""
    import json, os, pathlib, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import nion_files
    from nion.data import xdata_1_0 as xd
    from nion.instrumentation import HardwareSource, camera_base, scan_base
    from nion.swift.model import DataItem
    from nion.usim_device import DeviceConfiguration

    scan_base.run(None)
    camera_base.run(None)
    configuration = DeviceConfiguration.AcquisitionContextConfiguration()
    configuration.run()
    scan = HardwareSource.HardwareSourceManager().get_hardware_source_for_hardware_source_id(
        configuration.scan_module.device.scan_device_id)
    params = scan.get_frame_parameters(0)
    params.pixel_size = ({size}, {size})
    params.fov_nm = {fov_nm!r}
    params.pixel_time_us = 1.0
    frames = [scan.record_immediate(params, sync_timeout=30)[0] for _ in range({frames})]
    sequence = xd.sequence_join(frames)  # as Nion Swift's sequence processing joins frames
    folder = pathlib.Path({folder!r})
    np.save(folder / "acquired.npy", sequence.data)
    out = {{"acquired": str(folder / "acquired.npy"),
            "calibrations": [[c.offset, c.scale, c.units]
                             for c in sequence.dimensional_calibrations],
            "hardware_source": frames[0].metadata["hardware_source"]}}
    np.save(folder / "image.npy", frames[0].data)
    out["image"] = str(folder / "image.npy")
    with nion_files.project(folder / "project") as document_model:
        for kind, large in (("ndata", False), ("h5", True)):
            item = DataItem.new_data_item(sequence)
            item.large_format = large
            document_model.append_data_item(item)
            out[kind] = item._test_get_file_path()
        item = DataItem.new_data_item(frames[0])  # one acquired frame, as the scan stores it
        document_model.append_data_item(item)
        out["image_ndata"] = item._test_get_file_path()
        out["image_created"] = item.created.isoformat()  # UTC, as Nion Swift stores it
    print(json.dumps(out), flush=True)
    os._exit(0)  # the simulator's acquisition threads do not all stop on their own
""")


def usim_acquisition(folder: pathlib.Path, *, frames: int = 3, size: int = 32,
                     pixel_nm: float = PIXEL_NM) -> dict:
    """A headless ``nionswift-usim`` STEM scan of ``frames`` frames, stored by Nion Swift.

    A child process runs the simulated instrument and scan device, records ``frames`` HAADF
    frames of ``size`` x ``size`` pixels over a field of view of ``size * pixel_nm``, joins
    them into a sequence (Nion's ``sequence_join``, which keeps calibrations but drops the
    frames' metadata) and stores it in a file-backed project as a ``.ndata`` and a
    large-format ``.h5`` item, plus the first frame as an ``.ndata`` image item
    (``image_ndata``, with its acquisition metadata). Returns the item paths, the acquired
    arrays (``acquired``, ``image``; saved with ``np.save``), the sequence's calibrations, the
    first frame's ``hardware_source`` metadata and the image item's ``created`` time
    (``image_created``, UTC).
    """
    folder.mkdir(parents=True, exist_ok=True)
    code = _USIM.format(tests=os.path.dirname(os.path.abspath(__file__)), size=int(size),
                        fov_nm=float(size * pixel_nm), frames=int(frames), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"nionswift-usim acquisition failed (rc {done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return json.loads(lines[-1])
