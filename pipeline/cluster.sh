#!/bin/sh
# leanvm cluster control for every VM in this out/ directory (copied here by `doit`).
# Usage: cluster.sh up | down | status | console NAME | ssh NAME [SSH ARGS...]
#   up       start every VM detached (serial console in vms/NAME/console.log)
#   down     power every VM off (ACPI), then stop QEMU after LEANVM_STOP_TIMEOUT seconds (60)
#   status   which VMs run, their pids and ssh ports
#   console  follow a detached VM's serial console (Ctrl-c stops following)
#   ssh      ssh into a VM as LEANVM_SSH_USER (default core) through its forwarded port
# LEANVM_ACCEL and LEANVM_APPEND are passed on to each run.sh.
set -eu

out=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)

die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }

vms() {
  for dir in "$out"/vms/*/; do
    [ -x "${dir}run.sh" ] && basename "$dir"
  done
  return 0
}

# The pid of VM $1's QEMU, if it runs.
vm_pid() {
  pid=$(cat "$out/vms/$1/qemu.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# VM $1's ssh port, from the identity doit recorded for it (out/state/vms/NAME.env).
ssh_port() { sed -n 's/^ssh_port=//p' "$out/state/vms/$1.env" 2>/dev/null; }

check_vm() { [ -x "$out/vms/$1/run.sh" ] || die "no VM named '$1' in $out/vms"; }

# Send one monitor command to VM $1 through its FIFO, never blocking on a dead QEMU.
monitor() {
  printf '%s\n' "$2" >"$out/vms/$1/monitor.in" &
  writer=$!
  sleep 1
  kill "$writer" 2>/dev/null || true
  wait "$writer" 2>/dev/null || true
}

up() {
  failed=0
  for vm in $(vms); do
    if pid=$(vm_pid "$vm"); then
      echo "$vm: already running (pid $pid)"
    elif "$out/vms/$vm/run.sh" --detach; then
      echo "$vm: started (pid $(cat "$out/vms/$vm/qemu.pid"), ssh 127.0.0.1:$(ssh_port "$vm"))"
    else
      failed=1
    fi
  done
  return "$failed"
}

still_running() {
  for vm in $(vms); do vm_pid "$vm" >/dev/null && echo "$vm"; done
  return 0
}

# The cluster network's switch stops once no VM of this out/ runs or starts (under the
# lock that every run.sh takes to start or leave it).
stop_switch_if_unused() {
  [ -d "$out/net" ] || return 0
  (
    flock 9 || exit 1
    for vm in $(vms); do vm_pid "$vm" >/dev/null && exit 0; done
    for entry in "$out"/net/users/*; do
      [ -e "$entry" ] || continue
      pid=$(cat "$entry" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && exit 0
      rm -f "$entry"
    done
    pid=$(cat "$out/net/switch.pid" 2>/dev/null) || pid=""
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      tries=0
      while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 100 ]; do sleep 0.05; tries=$((tries + 1)); done
    fi
    rm -rf "$out/net/switch" "$out/net/switch.pid"
  ) 9>"$out/net/lock"
}

down() {
  timeout=${LEANVM_STOP_TIMEOUT:-60}
  for vm in $(still_running); do monitor "$vm" system_powerdown; done
  waited=0
  while [ -n "$(still_running)" ] && [ "$waited" -lt "$timeout" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  for vm in $(still_running); do
    echo "$vm: did not power off within ${timeout}s; stopping QEMU"
    monitor "$vm" quit
  done
  for signal in TERM KILL; do
    for vm in $(still_running); do
      pid=$(vm_pid "$vm") && kill "-$signal" "$pid" 2>/dev/null
      sleep 1
    done
  done
  stop_switch_if_unused
  for vm in $(vms); do echo "$vm: stopped"; done
}

status() {
  printf '%-24s %-8s %-8s %s\n' VM STATE PID SSH
  for vm in $(vms); do
    if pid=$(vm_pid "$vm"); then state=running; else state=stopped pid=-; fi
    printf '%-24s %-8s %-8s %s\n' "$vm" "$state" "$pid" "127.0.0.1:$(ssh_port "$vm")"
  done
}

case ${1-} in
  up) up ;;
  down) down ;;
  status) status ;;
  console)
    [ $# -eq 2 ] || die "usage: cluster.sh console NAME"
    check_vm "$2"
    [ -f "$out/vms/$2/console.log" ] || die "VM $2 has no console.log: start it with 'cluster.sh up'"
    exec tail -n +1 -f "$out/vms/$2/console.log" ;;
  ssh)
    [ $# -ge 2 ] || die "usage: cluster.sh ssh NAME [SSH ARGS...]"
    check_vm "$2"
    port=$(ssh_port "$2")
    shift 2
    exec ssh -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      "${LEANVM_SSH_USER:-core}@127.0.0.1" "$@" ;;
  *) die "usage: cluster.sh up | down | status | console NAME | ssh NAME [SSH ARGS...]" ;;
esac
