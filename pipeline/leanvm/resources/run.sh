#!/bin/sh
# leanvm launcher of VM NAME: out/vms/NAME/run.sh, the same file for every VM (copied there by
# `doit`). It hands over to out/'s runtime (python3, or LEANVM_PYTHON); see run.sh --help.
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || exit 1
out=${here%/*/*}
python=${LEANVM_PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "run.sh: $python not found: install python3 (3.9 or newer) or set LEANVM_PYTHON" >&2
  exit 1
fi
if [ ! -r "$out/leanvm-runtime.pyz" ]; then
  echo "run.sh: $out/leanvm-runtime.pyz is missing: run doit again" >&2
  exit 1
fi
exec "$python" -I -S "$out/leanvm-runtime.pyz" run "$out" "${here##*/}" "$@"
