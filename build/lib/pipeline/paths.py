"""Where leanvm's own files are: the checkout's configs/, or its copy installed as package data."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
CONFIGS = PACKAGE / "configs" if (PACKAGE / "configs").is_dir() else CHECKOUT / "configs"
DEFAULT_CLUSTER = CONFIGS / "cluster.yaml"

