#!/bin/sh
# Install everything leanvm needs on Debian: system packages (as root, or via sudo), then
# a virtualenv in .venv with the project and its test tools. Safe to run again.
set -eu
cd "$(dirname -- "$0")/.."

packages="python3 python3-venv gnupg libarchive13 e2fsprogs fdisk squashfs-tools cpio gzip pigz curl
qemu-system-x86 qemu-system-arm binutils qemu-utils shellcheck busybox-static kmod vde2 dpkg apt openssh-client dropbear-bin libcap2-bin
libvirt-daemon-system libvirt-clients libxml2-utils tini ignition passwd b3sum"
missing=""
for package in $packages; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing="$missing $package"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "leanvm setup: installing$missing" >&2
  $sudo apt-get update -q >&2
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]' >&2
