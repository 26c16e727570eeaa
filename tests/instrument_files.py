"""Real instrument files for the tests: the Thermo Fisher TIA and Velox EMD examples that HyperSpy
1.7.6 published in its wheel (``hyperspy/tests/io/FEI_old``, ``FEI_new``, ``emd_files``).

No installed package ships such files today (RosettaSciIO keeps its test data in its source
repository, and HyperSpy 2 left them out), and HyperSpy 1.7.6 cannot be installed beside the
HyperSpy 2 that Atomap pulls in. So the wheel is fetched from the package index, and only its
example files are unpacked into a cache outside the repository::

    python tests/instrument_files.py          # fetch (once; about 33 MB from the index)

The tests that read them (``tests/test_io_formats.py``) skip, naming that command, when the
cache is absent. ``STEMGPU_TESTDATA`` moves the cache (default ``~/.cache/stemgpu-testdata``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.7.6"
_MEMBERS = ("hyperspy/tests/io/FEI_old/", "hyperspy/tests/io/FEI_new/",
            "hyperspy/tests/io/emd_files/fei_")
_MARKER = "complete"


def cache_root() -> Path:
    return Path(os.environ.get("STEMGPU_TESTDATA")
                or Path.home() / ".cache" / "stemgpu-testdata")


def hyperspy_io() -> Path | None:
    """The unpacked ``hyperspy/tests/io`` folder, or None when it was not fetched."""
    base = cache_root() / f"hyperspy-{VERSION}"
    return base / "hyperspy" / "tests" / "io" if (base / _MARKER).is_file() else None


def fetch() -> Path:
    """Download HyperSpy's wheel from the index and unpack its TIA / Velox example files.

    The folder is complete or absent: files go to a temporary folder renamed into place.
    """
    found = hyperspy_io()
    if found is not None:
        return found
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        # The wheel is only unpacked, never imported: one platform's wheel serves everywhere.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary", ":all:", "--platform", "manylinux2014_x86_64",
                        "--python-version", "3.11", "--implementation", "cp",
                        f"hyperspy=={VERSION}", "--dest", tmp], check=True)
        wheel = next(Path(tmp).glob(f"hyperspy-{VERSION}-*.whl"))
        out = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(_MEMBERS) and not n.endswith("/")]
            zf.extractall(out, members=names)
        (out / _MARKER).write_text(f"hyperspy {VERSION}: {len(names)} files\n")
        target = root / f"hyperspy-{VERSION}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return hyperspy_io()


if __name__ == "__main__":
    print(fetch())
