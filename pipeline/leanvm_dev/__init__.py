"""leanvm's developer tools, kept out of the wheel: the mini release (leanvm's offline
stand-in for Flatcar) with its init script and kernel-module helper, and the demo."""

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent.parent
