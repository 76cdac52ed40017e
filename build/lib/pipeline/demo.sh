#!/bin/sh
# The main command: install what is missing, then build and boot the offline demo.
set -eu
cd "$(dirname -- "$0")/.."
sh pipeline/setup.sh
exec .venv/bin/python -m pipeline.demo
