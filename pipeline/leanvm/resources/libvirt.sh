#!/bin/sh
# leanvm: this out/'s cluster under libvirt (copied here by `doit libvirt`).
# Usage: libvirt.sh [--connect URI] [--dir DIR] COMMAND...; see `libvirt.sh help`.
# shellcheck disable=SC2154  # prefix, network, python, kernel_args, ... come from sourced env files
set -eu

out=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)

die() { printf 'libvirt.sh: %s\n' "$*" >&2; exit 1; }
[ -r "$out/lib.sh" ] || die "$out/lib.sh is missing: run doit again"
[ -r "$out/libvirt/cluster.env" ] || die "$out/libvirt/cluster.env is missing: run doit libvirt"
# shellcheck source=/dev/null
. "$out/lib.sh"  # alive, port_in_use, first_boot
# shellcheck source=/dev/null
. "$out/libvirt/cluster.env"  # prefix, network, python

usage() {
  cat <<EOF
Usage: $0 [--connect URI] [--dir DIR] COMMAND...
Run this out/'s VMs as libvirt domains named $prefix-NAME, on network $network.
Commands run in order (e.g. define start):
  define    define the network and every domain (out/vms/NAME/domain.xml)
  start     start the network and every domain; adds the first-boot arguments to a VM whose
            root disk has no Ignition result, and LEANVM_APPEND to every VM
  stop      ACPI power-off, pressed every 5 s; domains still up after LEANVM_STOP_TIMEOUT
            seconds (60) are destroyed; then the network stops
  status    each VM's domain, state and ssh port
  undefine  undefine every domain and the network (they must be stopped)
  help      this text
Options:
  --connect URI  the libvirt to use (default: LIBVIRT_DEFAULT_URI, else virsh's default),
                 e.g. qemu:///system or qemu+ssh://HOST/system
  --dir DIR      where this out/ is on the libvirt host (default: $out); a remote host
                 needs this out/ (a bundle) unpacked there
Environment: LEANVM_ACCEL=auto|kvm|tcg (default auto: KVM if the host offers it for the VM's arch).
The console: virsh console $prefix-NAME, logged to vms/NAME/console.log.
EOF
}

connect=${LIBVIRT_DEFAULT_URI-}
dir=$out

v() { virsh ${connect:+--connect "$connect"} -q "$@"; }

# Run virsh; on failure, one line: $1 and virsh's last error.
v_or_die() {
  what=$1
  shift
  if ! result=$(v "$@" 2>&1); then
    detail=$(printf '%s\n' "$result" | sed -n 's/^error: //p' | tail -n 1)
    die "$what: ${detail:-$result}"
  fi
}

# The VMs with a domain: a retired VM (run.sh.retired) is left out, as cluster.sh does.
vms() { vms_in "$out" domain.xml; }

domain_of() { printf '%s-%s' "$prefix" "$1"; }

# VM $1's values (out/state/vms/NAME.env): boot arguments, ports.
load_vm() {
  [ -r "$out/state/vms/$1.env" ] || die "$out/state/vms/$1.env is missing: run doit again"
  # shellcheck source=/dev/null
  . "$out/state/vms/$1.env"
}

# The active domains of this out/, by VM name.
active_vms() {
  active=$(v list --name 2>/dev/null || true)
  for vm in $(vms); do
    printf '%s\n' "$active" | grep -qxF "$(domain_of "$vm")" && echo "$vm"
  done
  return 0
}

network_active() { v net-list --name 2>/dev/null | grep -qxF "$network"; }

# The host part of a remote URI (qemu+ssh://[USER@]HOST[:PORT]/...); empty if local.
uri_host() {
  uri=$(v uri 2>/dev/null || true)
  rest=${uri#*://}
  printf '%s' "${rest%%/*}"
}

check_libvirt() {
  command -v virsh >/dev/null 2>&1 || die "virsh not found: install it (apt-get install libvirt-clients)"
  v_or_die "cannot reach libvirt${connect:+ at $connect} (is libvirtd running? or pass --connect URI)" uri
  case $dir in
    /*) ;;
    *) die "--dir must be an absolute path, not '$dir'" ;;
  esac
}

# The Python that renders the domains: the one `doit libvirt` ran with, or LEANVM_PYTHON.
check_python() {
  python=${LEANVM_PYTHON:-$python}
  "$python" -c 'import leanvm.vm.libvirt' 2>/dev/null ||
    die "$python cannot import leanvm: set LEANVM_PYTHON to a Python that has leanvm installed"
}

# KVM or TCG for the VM whose values are loaded: auto is KVM where the libvirt host offers
# it for the VM's arch (never for a guest of another arch than the host's).
choose_accel() {
  accel=${LEANVM_ACCEL:-auto}
  case $accel in
    auto) if v domcapabilities --virttype kvm --arch "$cpu_arch" >/dev/null 2>&1; then accel=kvm; else accel=tcg; fi ;;
    kvm|tcg) ;;
    *) die "LEANVM_ACCEL must be auto, kvm or tcg, not '$accel'" ;;
  esac
}

# VM $1's domain XML with kernel command line $2, rendered complete by leanvm: its files
# where out/ is on the libvirt host (--dir), KVM or TCG as chosen.
render() { "$python" -m leanvm.vm.libvirt "$out" "$dir" "$prefix" "$1" "$accel" "$2"; }

# Define VM $1's domain with kernel command line $2.
define_vm() {
  render "$1" "$2" >"$xml" || exit 1
  v_or_die "cannot define $(domain_of "$1")" define "$xml"
}

define() {
  check_python
  v net-info "$network" >/dev/null 2>&1 ||
    v_or_die "cannot define network $network" net-define "$out/libvirt/network.xml"
  for vm in $(vms); do
    load_vm "$vm"
    choose_accel
    define_vm "$vm" "$kernel_args"
    echo "$vm: defined as $(domain_of "$vm") ($accel)"
  done
}

# First boot of VM $1: decided where its root disk is, by lib.sh's first_boot.
is_first_boot() {
  disk="$dir/vms/$1/rootfs.img"
  host=$(uri_host)
  if [ -z "$host" ]; then
    first_boot "$disk" "$first_boot_args"
    return
  fi
  [ -n "$first_boot_args" ] || return 1
  port=${host##*:}
  [ "$port" != "$host" ] || port=22
  status=0
  { cat "$out/lib.sh"; printf 'die() { echo "$*" >&2; exit 3; }\nfirst_boot %s x\n' "'$disk'"; } |
    ssh -o BatchMode=yes -p "$port" "${host%:*}" sh -s || status=$?
  [ "$status" -le 1 ] || die "cannot read $disk on $host (ssh and debugfs)"
  return "$status"
}

# Checks before anything starts: a defined, stopped domain, no run.sh QEMU, free ports.
check_startable() {
  for vm in $(vms); do
    domain=$(domain_of "$vm")
    state=$(v domstate "$domain" 2>/dev/null) || die "domain $domain (VM $vm) is not defined: run libvirt.sh define"
    [ "$state" = "shut off" ] || die "domain $domain (VM $vm) is already $state: stop it first (libvirt.sh stop)"
    [ -z "$(uri_host)" ] || continue
    if pid=$(running_pid "$out/vms/$vm"); then die "VM $vm runs from run.sh (pid $pid): stop it first (cluster.sh down)"; fi
    load_vm "$vm"
    check_ports "$vm" "$host_ports"
  done
}

start() {
  [ -n "$(vms)" ] || die "no domain.xml in $out/vms: run doit libvirt"
  check_python
  check_startable
  network_active || v_or_die "cannot start network $network" net-start "$network"
  for vm in $(vms); do
    load_vm "$vm"
    choose_accel
    args=$kernel_args rule="not a first boot"
    if is_first_boot "$vm"; then args="$args $first_boot_args" rule="first boot"; fi
    # this boot's command line, then the plain one again for the next start (virt-manager, virsh)
    define_vm "$vm" "$args${LEANVM_APPEND:+ $LEANVM_APPEND}"
    v_or_die "cannot start $(domain_of "$vm")" start "$(domain_of "$vm")"
    define_vm "$vm" "$kernel_args"
    echo "$vm: started $(domain_of "$vm") ($accel, $rule, ssh 127.0.0.1:$ssh_port)"
  done
}

press_power_button() {
  for vm; do v shutdown --mode acpi "$(domain_of "$vm")" >/dev/null 2>&1 || true; done
}

stop() {
  timeout=$(stop_timeout) || exit 1
  power_off active_vms press_power_button "$timeout"
  for vm in $(active_vms); do
    echo "$vm: did not power off within ${timeout}s; destroying $(domain_of "$vm")"
    v destroy "$(domain_of "$vm")" >/dev/null 2>&1 || true
  done
  [ -z "$(active_vms)" ] || die "cannot stop: $(active_vms | tr '\n' ' ')"
  ! network_active || v_or_die "cannot stop network $network" net-destroy "$network"
  for vm in $(vms); do echo "$vm: stopped"; done
}

status() {
  printf '%-20s %-36s %-10s %s\n' VM DOMAIN STATE SSH
  for vm in $(vms); do
    state=$(v domstate "$(domain_of "$vm")" 2>/dev/null) || state=undefined
    load_vm "$vm"
    printf '%-20s %-36s %-10s %s\n' "$vm" "$(domain_of "$vm")" "$state" "127.0.0.1:$ssh_port"
  done
}

undefine() {
  active=$(active_vms)
  [ -z "$active" ] || die "domains still run ($(echo "$active" | tr '\n' ' ' | sed 's/ $//')): libvirt.sh stop first"
  for vm in $(vms); do
    if v dominfo "$(domain_of "$vm")" >/dev/null 2>&1; then
      v_or_die "cannot undefine $(domain_of "$vm")" undefine "$(domain_of "$vm")"
      echo "$vm: undefined $(domain_of "$vm")"
    fi
  done
  ! network_active || v_or_die "cannot stop network $network" net-destroy "$network"
  if v net-info "$network" >/dev/null 2>&1; then
    v_or_die "cannot undefine network $network" net-undefine "$network"
  fi
}

while [ $# -gt 0 ]; do
  case $1 in
    --connect) [ $# -ge 2 ] || die "--connect needs a URI"; connect=$2; shift 2 ;;
    --dir) [ $# -ge 2 ] || die "--dir needs a directory"; dir=${2%/}; shift 2 ;;
    help|--help|-h) usage; exit 0 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { usage >&2; exit 1; }
for command; do
  case $command in
    define|start|stop|status|undefine) ;;
    *) die "unknown command '$command' (commands: define start stop status undefine help)" ;;
  esac
done
check_libvirt
xml=$(mktemp)
trap 'rm -f "$xml"' EXIT
for command; do "$command"; done
