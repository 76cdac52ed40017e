#!/bin/sh
# leanvm cluster control for every VM in this out/ directory (copied here by `doit`): it hands
# over to out/'s runtime (python3, or LEANVM_PYTHON). Usage: cluster.sh COMMAND; see cluster.sh help.
out=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || exit 1
python=${LEANVM_PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "cluster.sh: $python not found: install python3 (3.9 or newer) or set LEANVM_PYTHON" >&2
  exit 1
fi
if [ ! -r "$out/leanvm-runtime.pyz" ]; then
  echo "cluster.sh: $out/leanvm-runtime.pyz is missing: run doit again" >&2
  exit 1
fi
exec "$python" -I -S "$out/leanvm-runtime.pyz" cluster "$out" "$0" "$@"
