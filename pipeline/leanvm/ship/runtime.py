"""out/leanvm-runtime.pyz: the runtime package (leanvm.runtime) and the stdlib-only modules it
imports, as a zipapp that the host's python3 runs, so that out/ and bundles never need the
venv. Its bytes depend on the sources only (fixed member times): a rebuild is identical."""

import io
from pathlib import Path
from zipfile import ZIP_DEFLATED, ZipFile, ZipInfo

from leanvm.fsutil import write_atomic

PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/leanvm
# What the runtime imports of leanvm (a lint test holds them to the standard library)
MODULES = ("__init__.py", "arch.py", "errors.py", "host.py", "proc.py",
           *(f"runtime/{p.name}" for p in sorted((PACKAGE / "runtime").glob("*.py"))),
           "state/__init__.py", "state/layout.py", "state/valuesfile.py")
SOURCES = [PACKAGE / module for module in MODULES]


def members() -> list[tuple[str, bytes]]:
    """(name in the archive, bytes): the modules under leanvm/, and the runtime's __main__ at the top."""
    found = [(f"leanvm/{module}", (PACKAGE / module).read_bytes()) for module in MODULES]
    return [("__main__.py", (PACKAGE / "runtime" / "__main__.py").read_bytes()), *found]


def write(dest: Path) -> None:
    buffer = io.BytesIO()
    with ZipFile(buffer, "w", ZIP_DEFLATED) as archive:
        for name, data in members():
            info = ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    write_atomic(dest, buffer.getvalue())
