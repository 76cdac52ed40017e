# shellcheck shell=sh
# leanvm: run as `sh -s -- DISK` after lib.sh (by `leanvm libvirt start`, on the host that
# has the disk, over ssh for a remote libvirt): lib.sh's first_boot rule for root disk DISK.
# Exit status 0: a first boot; 1: not; 3: DISK could not be read (one line on stderr).
die() { printf '%s\n' "$*" >&2; exit 3; }
first_boot "$1" x
