#!/bin/sh
# The main command: install what is missing, then build and boot the offline demo.
set -eu
cd "$(dirname -- "$0")/.."
sh pipeline/setup.sh
PYTHONPATH="$PWD/pipeline${PYTHONPATH:+:$PYTHONPATH}"  # leanvm_dev: beside the package, not in it
export PYTHONPATH
exec .venv/bin/python -m leanvm_dev.demo "$@"  # --arch arm64: the arm64 demo, in out/arm64
