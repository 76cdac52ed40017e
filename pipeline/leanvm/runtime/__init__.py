"""The runtime that out/ carries (out/leanvm-runtime.pyz): what runs beside the VMs, with the
standard library only, on the host's python3 (3.9 or newer), never the venv."""
