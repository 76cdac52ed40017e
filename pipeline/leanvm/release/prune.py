"""Remove image versions that no VM uses any more, and the snapshots saved on them (`doit prune`)."""

import shutil
from pathlib import Path

from leanvm.errors import note
from leanvm.state import identity, snapshots
from leanvm.state.layout import Layout


def unused_versions(out: Path, keep: set[Path]) -> list[Path]:
    """Image version directories that no VM (retired ones included) was built for, and not in `keep`."""
    used = set(keep) | {out / i.image_dir for i in identity.load(out).values() if i.image_dir}
    return [v for v in Layout(out).image_dirs() if v not in used]


def prune(out: Path, keep: set[Path]) -> None:
    for version in unused_versions(out, keep):
        release = version.parent.name
        shutil.rmtree(version)
        shutil.rmtree(Layout(out).cache(release, version.name), ignore_errors=True)
        note(f"pruned {version.relative_to(out)}")
    for snapshot in snapshots.complete(out):
        gone = sorted(d for d in snapshots.image_dirs(snapshot) if not (out / d).is_dir())
        if gone:
            snapshots.remove(snapshot)
            note(f"pruned snapshot {snapshot.name} (saved on {', '.join(gone)}, which is gone)")
