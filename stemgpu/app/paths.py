"""Output paths of ``stemgpu run`` and ``stemgpu demo``, checked before any work is done."""

from __future__ import annotations

import os

__all__ = ["IMAGE_FORMATS", "check_output_paths"]

#: File name extensions a report figure may have (formats matplotlib writes).
IMAGE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps", ".webp")


def check_output_paths(out, figure) -> None:
    """Fail before any work when a results file or figure could not be written.

    Raises
    ------
    FileNotFoundError, PermissionError, IsADirectoryError
        The folder is missing or not writable, or the target is a folder.
    ValueError
        ``figure`` has no image file extension (:data:`IMAGE_FORMATS`).

    Examples
    --------
    >>> from stemgpu.app.paths import check_output_paths
    >>> check_output_paths("results.h5", "report.png")  # the current folder: fine
    >>> check_output_paths(None, "report.h5")
    Traceback (most recent call last):
    ...
    ValueError: --figure report.h5: not an image file name; use one of .png, ...
    """
    for option, target in (("--out", out), ("--figure", figure)):
        if not target:
            continue
        folder = os.path.dirname(os.path.abspath(os.fspath(target)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {target}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{option} {target}: folder {folder} is not writable")
        if os.path.isdir(os.fspath(target)):
            raise IsADirectoryError(f"{option} {target}: is a directory")
    if figure and os.path.splitext(os.fspath(figure))[1].lower() not in IMAGE_FORMATS:
        raise ValueError(f"--figure {figure}: not an image file name; use one of "
                         + ", ".join(IMAGE_FORMATS))
