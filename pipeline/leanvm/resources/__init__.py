"""The files leanvm ships beside its code, read as package resources: the shell that `doit`
copies into out/, the release profiles and their signing keys, and the default cluster
file. In a checkout, releases/, keys/ and cluster.yaml here are links to configs/ (the one
copy); a wheel holds the files themselves."""

from importlib.resources import files
from pathlib import Path

HERE = Path(str(files(__name__)))
RUN_SH = HERE / "run.sh"  # installed as out/vms/NAME/run.sh
CLUSTER_SCRIPT = HERE / "cluster.sh"
LIBVIRT_SCRIPT = HERE / "libvirt.sh"
PROFILES = (HERE / "releases").resolve()  # leanvm's own release profiles (flatcar-stable, ...)
DEFAULT_CLUSTER = (HERE / "cluster.yaml").resolve()
