#!/bin/sh
# leanvm: this out/'s cluster under libvirt (copied here by `doit libvirt`): `leanvm libvirt`
# with --out set to this out/, run by the Python that built it (or LEANVM_PYTHON).
# Usage: libvirt.sh [--connect URI] [--dir DIR] VERB...; see libvirt.sh --help.
set -eu
out=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
die() { printf 'libvirt.sh: %s\n' "$*" >&2; exit 2; }
env="$out/libvirt/cluster.env"
[ -r "$env" ] || die "$env is missing: run doit libvirt"
# shellcheck source=/dev/null
. "$env"  # python (shell-quoted by doit libvirt), prefix, network
# shellcheck disable=SC2154  # python comes from cluster.env
python=${LEANVM_PYTHON:-$python}
"$python" -c 'import leanvm.vm.libvirtctl' 2>/dev/null ||
  die "$python cannot import leanvm: set LEANVM_PYTHON to a Python that has leanvm installed"
case ${1-} in help) shift; set -- --help "$@" ;; esac
exec "$python" -m leanvm.dag.cli libvirt --out "$out" "$@"
