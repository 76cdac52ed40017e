#!/bin/sh
# leanvm cluster control for every VM in this out/ directory (copied here by `doit`).
# Usage: cluster.sh COMMAND; see `cluster.sh help`.
set -eu

out=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)

die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }
[ -r "$out/lib.sh" ] || die "$out/lib.sh is missing: run doit again"
# shellcheck source=/dev/null
. "$out/lib.sh"

usage() {
  cat <<EOF
Usage: $0 COMMAND
  up [--wait [SECONDS]]  start every VM detached (console in vms/NAME/console.log); with
                         --wait, return once every VM's sshd answers (default 300 s)
  down                   power every VM off (ACPI button, pressed every 5 s), then stop QEMU
                         after LEANVM_STOP_TIMEOUT seconds (60)
  status                 which VMs run, their pids and ssh ports
  console NAME           follow a detached VM's serial console (Ctrl-c stops following)
  ssh NAME [-- CMD...]   ssh into a VM as LEANVM_SSH_USER (default core) with the cluster key
                         (ssh/id_ed25519); the remote command's exit status is passed through
  help                   this text
LEANVM_ACCEL and LEANVM_APPEND are passed on to each run.sh.
EOF
}

# ssh to VM $1 with the cluster key; host keys in ssh/known_hosts under the alias leanvm-NAME.
vm_ssh() {
  vm=$1
  shift
  port=$(ssh_port "$vm")
  [ -n "$port" ] || die "VM $vm has no recorded ssh port: run doit"
  [ -r "$out/ssh/id_ed25519" ] || die "no cluster key $out/ssh/id_ed25519: run doit"
  ssh -i "$out/ssh/id_ed25519" -p "$port" -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR \
    -o UserKnownHostsFile="$out/ssh/known_hosts" -o StrictHostKeyChecking=accept-new \
    -o HostKeyAlias="leanvm-$vm" -o HashKnownHosts=no -o ConnectTimeout=10 "${LEANVM_SSH_USER:-core}@127.0.0.1" "$@"
}

# Wait until every VM's sshd answers, at most $1 seconds; one line naming those that did not.
wait_for_ssh() {
  deadline=$(($(date +%s) + $1))
  pending=$(vms)
  while [ -n "$pending" ]; do
    still=""
    for vm in $pending; do
      vm_ssh "$vm" true </dev/null >/dev/null 2>&1 || still="$still $vm"
    done
    pending=${still# }
    [ -z "$pending" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || die "no sshd answered within $1 s on:$still"
    sleep 2
  done
  echo "every VM answers ssh"
}

vms() {
  for dir in "$out"/vms/*/; do
    [ -x "${dir}run.sh" ] && basename "$dir"
  done
  return 0
}

# The pid of VM $1's QEMU, if it runs.
vm_pid() {
  pid=$(cat "$out/vms/$1/qemu.pid" 2>/dev/null) || return 1
  alive "$pid" && echo "$pid"
}

# VM $1's ssh port, from the identity doit recorded for it (out/state/vms/NAME.env).
ssh_port() { sed -n 's/^ssh_port=//p' "$out/state/vms/$1.env" 2>/dev/null; }

check_vm() { [ -x "$out/vms/$1/run.sh" ] || die "no VM named '$1' in $out/vms"; }

# Send one monitor command to VM $1 through its FIFO, never blocking on a dead QEMU.
# Send monitor command $1 to each VM named after it through its FIFO, all at once, never
# blocking on a dead QEMU (a writer that cannot open the FIFO is killed after a second).
monitor() {
  command=$1
  shift
  writers=""
  for vm; do
    printf '%s\n' "$command" >"$out/vms/$vm/monitor.in" &
    writers="$writers $!"
  done
  sleep 1
  for writer in $writers; do
    kill "$writer" 2>/dev/null || true
    wait "$writer" 2>/dev/null || true
  done
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
      pid=$(cat "$entry" 2>/dev/null) && alive "$pid" && exit 0
      rm -f "$entry"
    done
    stop_switch "$out/net"
  ) 9>"$out/net/lock"
}

down() {
  timeout=${LEANVM_STOP_TIMEOUT:-60}
  # Press the power button every few seconds: a guest that is still booting only watches
  # it once booted (systemd-logind, or the mini release's init).
  waited=0
  while [ -n "$(still_running)" ] && [ "$waited" -lt "$timeout" ]; do
    if [ $((waited % 5)) -eq 0 ]; then
      # shellcheck disable=SC2046  # one word per VM name
      monitor system_powerdown $(still_running)
      waited=$((waited + 1))  # monitor() takes a second
    fi
    sleep 1
    waited=$((waited + 1))
  done
  stubborn=$(still_running)
  for vm in $stubborn; do
    echo "$vm: did not power off within ${timeout}s; stopping QEMU"
    echo "cluster.sh down: no power-off within ${timeout}s" >"$out/vms/$vm/forced-stop"
  done
  # shellcheck disable=SC2086  # one word per VM name
  [ -z "$stubborn" ] || monitor quit $stubborn
  for signal in TERM KILL; do
    for vm in $(still_running); do
      pid=$(vm_pid "$vm") && kill "-$signal" "$pid" 2>/dev/null
      sleep 1
    done
  done
  stop_switch_if_unused
  for vm in $(vms); do
    rm -f "$out/vms/$vm/monitor.in" "$out/vms/$vm/monitor.out"
    echo "$vm: stopped"
  done
}

status() {
  printf '%-24s %-8s %-8s %s\n' VM STATE PID SSH
  for vm in $(vms); do
    if pid=$(vm_pid "$vm"); then state=running; else state=stopped pid=-; fi
    printf '%-24s %-8s %-8s %s\n' "$vm" "$state" "$pid" "127.0.0.1:$(ssh_port "$vm")"
  done
}

case ${1-} in
  up)
    up_status=0
    up || up_status=$?
    if [ "${2-}" = --wait ]; then
      seconds=${3:-300}
      case $seconds in ''|*[!0-9]*) die "up --wait takes a number of seconds, not '$seconds'" ;; esac
      [ "$up_status" -eq 0 ] || die "some VMs did not start; not waiting for ssh"
      wait_for_ssh "$seconds"
    fi
    exit "$up_status" ;;
  help|--help|-h) usage ;;
  down) down ;;
  status) status ;;
  console)
    [ $# -eq 2 ] || die "usage: cluster.sh console NAME"
    check_vm "$2"
    [ -f "$out/vms/$2/console.log" ] || die "VM $2 has no console.log: start it with 'cluster.sh up'"
    exec tail -n +1 -f "$out/vms/$2/console.log" ;;
  ssh)
    [ $# -ge 2 ] || die "usage: cluster.sh ssh NAME [-- CMD...]"
    check_vm "$2"
    name=$2
    shift 2
    [ "${1-}" != -- ] || shift
    vm_ssh "$name" "$@" ;;
  *) usage >&2; exit 1 ;;
esac
