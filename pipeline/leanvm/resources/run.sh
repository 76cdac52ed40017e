#!/bin/sh
# shellcheck disable=SC2154  # the VM's values (ssh_port, mac, kernel_args, ...) come from its values file
# shellcheck disable=SC2317  # functions run through with_net_lock and traps
# leanvm launcher of one VM: out/vms/NAME/run.sh, the same file for every VM, copied there by
# `doit`. Everything it needs of VM NAME is in NAME's values file, out/state/vms/NAME.env.
# Usage: run.sh [--print | --detach | --help] [--restore SNAP] [QEMU ARGS...]; see run.sh --help.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
out=${here%/*/*}
name=${here##*/}
if [ ! -r "$out/lib.sh" ]; then
  echo "run.sh: $out/lib.sh is missing: run doit again" >&2
  exit 1
fi
# shellcheck source=/dev/null
. "$out/lib.sh"  # out/'s names (OUT_*, VM_*, ...); alive, running_pid, check_ports, stop_switch, first_boot
values=$out/$OUT_VALUES/$name.env
if [ ! -r "$values" ]; then
  echo "run.sh: $values is missing: run doit again to record VM $name's ports and addresses" >&2
  exit 1
fi
# shellcheck source=/dev/null
. "$values"
images=$out/$image_dir
qemu=${LEANVM_QEMU:-$qemu}

die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
warn() { printf 'run.sh: warning: %s\n' "$*" >&2; }

usage() {
  cat <<EOF
Usage: $0 [--print | --detach | --help] [--restore SNAP] [QEMU ARGS...]
Start VM $name ($release $version).
  (no option)  foreground, serial console on this terminal (Ctrl-a x quits)
  --print      print the QEMU command line (runnable as printed) instead of running it
  --detach     run in the background: console in console.log
  --restore SNAP
               start it as snapshot SNAP saved it (out/snapshots/SNAP, made by
               cluster.sh snapshot): its disks put back, its memory loaded, its clock set
The QEMU monitor is reachable through the FIFOs monitor.in/.out beside run.sh.
  --help       this text
Environment: LEANVM_ACCEL=auto|kvm|hvf|tcg (default auto), LEANVM_QEMU=BINARY,
  LEANVM_APPEND="ARGS" (extra kernel arguments), LEANVM_BALLOON=on|off (default on),
  LEANVM_TCG_CACHE=MiB (TCG's translated-code cache; default QEMU's, 1 GiB at most)
EOF
}

# QEMU separates option values with ','; a literal comma in a path is written ',,'.
qpath() { printf '%s' "$1" | sed 's/,/,,/g'; }

# One sh word per argument, so that the printed line can be pasted into a shell.
print_command() {
  for arg; do printf '%s ' "$(sh_word "$arg")"; done
  echo
}


# This VM's QEMU command: $1 runs it (exec, command or print_command); the rest are extra
# QEMU arguments. Optional parts are ${value:+words}: absent when the value is empty.
vm_qemu() {
  runner=$1
  shift
  $runner "$qemu" \
    -name "$name" \
    -machine "$machine" \
    -accel "$accel_options" \
    -cpu "$cpu" \
    -smp "$cpus" \
    -m "$memory" \
    -pidfile "$here/$VM_QEMU_PID" \
    -netdev "$user_netdev" \
    -device "virtio-net-pci,netdev=net0,mac=$mac" \
    -drive "if=none,id=usr,format=raw,readonly=on,file=$(qpath "$images/$IMAGE_USR")" \
    -device virtio-blk-pci,drive=usr,serial=usr.readonly \
    -drive "if=none,id=root,format=raw,discard=unmap,file=$(qpath "$here/$VM_ROOT_DISK")" \
    -device virtio-blk-pci,drive=root,serial=rootfs \
    -drive "if=none,id=oem,format=raw,discard=unmap,file=$(qpath "$here/$VM_OEM_DISK")" \
    -device virtio-blk-pci,drive=oem,serial=oem \
    -drive "if=none,id=config,format=raw,readonly=on,file=$(qpath "$here/$VM_CONFIG_DRIVE")" \
    -device virtio-blk-pci,drive=config,serial=config-2 \
    ${ignition_fw_cfg:+-fw_cfg "name=$ignition_fw_cfg,file=$(qpath "$here/$VM_IGNITION")"} \
    -kernel "$images/$IMAGE_KERNEL" \
    ${initrd:+-initrd "$images/$IMAGE_INITRD"} \
    -append "$append" \
    "$@"
}


refuse_if_running() {
  if pid=$(running_pid "$here"); then die "VM $name is already running (pid $pid); stop it before starting it again"; fi
}

# --- the private cluster network: a rootless VDE switch shared by the VMs of this out/ ---
# Starting and stopping it happen under one lock (out/net/lock). Every VM that uses it has
# an entry in out/net/users/; the last one to leave stops it.
net=$out/$OUT_NET

with_net_lock() {
  mkdir -p "$net/$NET_USERS"
  (
    flock 9 || exit 1
    "$@"
  ) 9>"$net/$NET_LOCK"
}

switch_alive() { alive "$(cat "$net/$NET_SWITCH_PID" 2>/dev/null || true)" && [ -S "$net/$NET_SWITCH/ctl" ]; }

ensure_switch() {
  echo "$$" >"$net/$NET_USERS/$name"
  switch_alive && return 0
  stop_switch "$net"  # whatever a dead or half-started switch left behind
  # vde_switch names its control socket by its absolute path, and a unix socket's path holds at
  # most 107 bytes: under a long out/ path, out/net/switch links to a short directory
  if [ "${#net}" -gt 90 ]; then
    short=$(short_switch_dir "$net")
    rm -rf "$short"  # (one a killed switch left; a directory of another user's stays, and mkdir fails)
    if ! { mkdir -m 700 "$short" && ln -s "$short" "$net/$NET_SWITCH"; }; then
      die "cannot make the cluster switch's directory $short (TMPDIR)"
    fi
  fi
  # The switch must not inherit the locks (fd 8: run.lock, fd 9: net/lock) or this output.
  (cd "$net" && vde_switch --sock "$NET_SWITCH" --pidfile "$net/$NET_SWITCH_PID" --daemon) </dev/null >/dev/null 2>&1 8>&- 9>&- ||
    true
  tries=0
  until switch_alive; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || die "cannot start the cluster network switch in $net (vde_switch)"
    sleep 0.05
  done
}

# True if VM $1 (an entry in users/) still runs or is still starting.
net_user_alive() {
  alive "$(cat "$net/$NET_USERS/$1" 2>/dev/null || true)" || running_pid "$out/$OUT_VMS/$1" >/dev/null
}

leave_switch() {
  rm -f "$net/$NET_USERS/$name"
  for entry in "$net/$NET_USERS"/*; do
    [ -e "$entry" ] || continue
    net_user_alive "${entry##*/}" && return 0
    rm -f "$entry"
  done
  stop_switch "$net"
}

# --- options -----------------------------------------------------------------------------
mode=foreground
case ${1-} in
  --print) mode=print; shift ;;
  --detach) mode=detach; shift ;;
  --supervise) mode=supervise; shift ;;  # internal: the session a --detach VM runs in
  --help|-h) usage; exit 0 ;;
esac

restore="" resume=""
case ${1-} in
  --restore)
    [ -n "${2-}" ] || die "usage: run.sh [--detach] --restore SNAP"
    [ "$mode" != print ] || die "--print does not take --restore"
    restore=$2 resume=$2
    shift 2 ;;
  --resume) resume=$2; shift 2 ;;  # internal: the snapshot's disks are in place already
esac
snapshot_dir=$out/$OUT_SNAPSHOTS/$resume
# The disks a restore swaps are this run.sh's to keep or put back, except under cluster.sh
# restore's --resume: cluster.sh keeps them once every VM runs the snapshot.
disks_are_mine=yes
if [ -n "$resume" ] && [ -z "$restore" ]; then disks_are_mine=no; fi
if [ -n "$resume" ]; then
  check_snapshot_name "$resume"
  [ -r "$snapshot_dir/$SNAPSHOT_MANIFEST" ] || die "no snapshot $resume in $out/$OUT_SNAPSHOTS: take one with" \
    "$out/cluster.sh snapshot $resume, or see the ones there with: ls $out/$OUT_SNAPSHOTS"
fi

# --- restore: the snapshot's disks put back, after every check ----------------------------
# Called just before QEMU starts, with the traps set. The disks this VM had are kept as
# *.before-restore until the restore is kept (QEMU runs the snapshot's state: run.sh
# --restore drops them then, cluster.sh restore once every VM runs), and put back if not.
put_snapshot_disks_back() {
  check_snapshot "$snapshot_dir" "$name" "$values" "$qemu"
  copy_snapshot_disks "$here" "$snapshot_dir/$name" ||
    die "cannot copy the disks of $snapshot_dir/$name; VM $name's disks are as they were"
  if ! swap_in_snapshot_disks "$here"; then
    put_old_disks_back "$here"
    die "cannot swap in the disks of $snapshot_dir/$name; VM $name's disks are as they were"
  fi
}

# A QEMU that fails at once under a KVM that auto chose (nested virtualisation: "failed to set
# MSR", an assertion) is started again under TCG, said in one line that holds this text.
KVM_FALLBACK="failed under KVM"

# Detach under a KVM that auto chose: QEMU counts as started once its guest printed on the
# console, or 3 s after start (the $1-th tenth of a second), or once it fell back to TCG.
kvm_settled() {
  [ "${LEANVM_ACCEL:-auto}" = auto ] && [ "$(resolve_accel auto "$arch")" = kvm ] || return 0
  [ "$1" -ge 30 ] || [ -s "$here/$VM_CONSOLE" ] || grep -q -a "$KVM_FALLBACK" "$here/$VM_RUN_LOG"
}

# The detached run.sh ended before QEMU ran: its own last word, or QEMU's first error line.
failed_start() {
  last=$(tail -n 1 "$here/$VM_RUN_LOG")
  case $last in
    run.sh:*) printf '%s\n' "$last" >&2 ;;
    *) qemu_error=$(grep -a -m 1 -e 'qemu-system' -e 'qemu:' "$here/$VM_RUN_LOG" || printf '%s' "$last")
       printf 'run.sh: VM %s: QEMU ended at once: %s; see %s\n' "$name" "$qemu_error" "$here/$VM_RUN_LOG" >&2 ;;
  esac
}

# --- detach: run.sh supervises the VM in a session of its own ----------------------------
# (so that a guest reboot relaunches QEMU there too); errors of that run.sh are its last
# line in run.log, said here.
if [ "$mode" = detach ]; then
  refuse_if_running
  command -v setsid >/dev/null 2>&1 || die "setsid not found: install util-linux"
  # (here, so that its line is seen; the run.sh below checks again)
  if [ "$disks_are_mine" = yes ]; then recover_disks "$here" run.sh; fi
  if [ -n "$restore" ]; then set -- --restore "$restore" "$@"; elif [ -n "$resume" ]; then set -- --resume "$resume" "$@"; fi
  setsid sh "$here/$VM_RUN_SH" --supervise "$@" </dev/null >/dev/null 2>"$here/$VM_RUN_LOG" &
  supervisor=$!
  tries=0
  # started once QEMU runs (a restore: once QEMU has loaded the snapshot and runs it, said in
  # resumed; it runs under the snapshot's accelerator, and its console stays quiet: no KVM
  # hang to watch for)
  until if [ -n "$resume" ]; then [ -f "$here/$VM_RESUMED" ] && running_pid "$here" >/dev/null
      else running_pid "$here" >/dev/null && kvm_settled "$tries"; fi; do
    if ! alive "$supervisor"; then
      # its last word is in run.log once it has ended and cleared up (reaped here, its
      # run.lock free): a retry at once finds the VM stopped
      wait "$supervisor" || true
      exec 8>>"$here/$VM_RUN_LOCK"
      flock -w 15 8 || true
      failed_start
      exit 1
    fi
    [ "$tries" -lt 600 ] || die "VM $name did not start within 60 s: see $here/$VM_RUN_LOG"
    sleep 0.1
    tries=$((tries + 1))
  done
  grep -a "$KVM_FALLBACK" "$here/$VM_RUN_LOG" >&2 || true
  exit 0
fi

accel=$(resolve_accel "${LEANVM_ACCEL:-auto}" "$arch") ||
  die "LEANVM_ACCEL must be auto, kvm, hvf or tcg, not '${LEANVM_ACCEL-}'"
if [ "$accel" != tcg ] && [ "$arch" != "$(host_arch)" ]; then
  die "LEANVM_ACCEL=$accel cannot run VM $name ($arch) on this $(host_arch) host: use LEANVM_ACCEL=tcg or auto"
fi
# QEMU's -cpu and -accel for accelerator $1.
use_accel() {
  accel=$1 cpu=host accel_options=$1
  if [ "$accel" = tcg ]; then
    # TCG keeps the code it translated in a cache that QEMU sizes at 1 GiB; the host holds
    # every page of it that fills (~100 MiB for an idle mini VM). LEANVM_TCG_CACHE caps it.
    cpu=max
    case ${LEANVM_TCG_CACHE-} in
      '') ;;
      *[!0-9]* | 0*) die "LEANVM_TCG_CACHE must be a size in MiB such as 64, not '$LEANVM_TCG_CACHE'" ;;
      *) accel_options="tcg,tb-size=$LEANVM_TCG_CACHE" ;;
    esac
  fi
}
use_accel "$accel"

# A restore starts QEMU as the snapshot saved it: the same accelerator and CPU, the same
# kernel command line, the state read from the snapshot's memory file.
incoming="" memory_file="" MEMORY_FD=6
if [ -n "$resume" ]; then
  accel=$(snapshot_accel "$snapshot_dir" "$name") || exit 1
  use_accel "$accel"
  [ "$cpu" = "$(manifest_value "$snapshot_dir/$SNAPSHOT_MANIFEST" "$name.cpu")" ] ||
    die "snapshot $resume: VM $name was saved with -cpu $(manifest_value "$snapshot_dir/$SNAPSHOT_MANIFEST" "$name.cpu"), this run.sh uses -cpu $cpu; boot it cold"
  # QEMU reads the memory file itself, from fd MEMORY_FD that run.sh opens on it (no pipe,
  # no cat: loading from a pipe took 0.2-0.3 s longer here)
  memory_file=$snapshot_dir/$name/$SNAPSHOT_MEMORY
  incoming="fd:$MEMORY_FD"
fi

# The kernel command line, with the first-boot arguments if this is a first boot (decided
# once nothing else stands in the way: a running VM's disk is not ours to read).
decide_boot() {
  if [ -n "$incoming" ]; then
    boot_rule="restored from snapshot $resume"
    append=$(manifest_value "$snapshot_dir/$SNAPSHOT_MANIFEST" "$name.append")
    return 0
  fi
  if first_boot "$here/$VM_ROOT_DISK" "$first_boot_args" "$mode"; then
    boot_rule="first boot: $here/$VM_ROOT_DISK $first_boot_why, so '$first_boot_args' is added"
    append="$kernel_args $first_boot_args"
  else
    boot_rule="not a first boot${first_boot_args:+: $here/$VM_ROOT_DISK $first_boot_why}"
    append=$kernel_args
  fi
  boot_rule="$boot_rule${first_boot_note-}"
  append="$append${LEANVM_APPEND:+ $LEANVM_APPEND}"
}

# NIC 2, the private cluster network, needs vde_switch (Debian: vde2); without it the VM
# still starts, with a warning.
cluster_net=true
if [ "$mode" != print ] && ! command -v vde_switch >/dev/null 2>&1; then
  warn "vde_switch not found (apt-get install vde2): VM $name starts without the cluster network"
  cluster_net=false
fi
if [ "$cluster_net" = true ]; then
  set -- -netdev "vde,id=cluster,sock=$NET_SWITCH" -device "virtio-net-pci,netdev=cluster,mac=$cluster_mac" "$@"
fi
# Free page reporting hands the pages a guest frees back to the host (Flatcar's kernel has
# virtio_balloon with it): an idle VM's host RAM shrinks once its page cache is dropped.
case ${LEANVM_BALLOON:-on} in
  on) set -- -device virtio-balloon-pci,free-page-reporting=on "$@" ;;
  off) ;;
  *) die "LEANVM_BALLOON must be on or off, not '$LEANVM_BALLOON'" ;;
esac
# The monitor FIFOs monitor.in/.out let cluster.sh down press the power button, in both modes;
# cluster.sh monitor talks QMP on qmp.sock, named from out/net, QEMU's working directory (a
# short path: a unix socket's path holds at most 108 bytes).
if [ "$mode" != print ]; then
  set -- -chardev "pipe,id=monitor,path=$(qpath "$here/$VM_MONITOR")" -mon chardev=monitor,mode=readline "$@"
fi
set -- -qmp "unix:$(qpath "../$OUT_VMS/$name/$VM_QMP"),server=on,wait=off" "$@"
# The serial console goes to console.log too (appended across the relaunches of one run):
# run.sh reads there whether the guest rebooted.
if [ "$mode" = supervise ]; then
  set -- -display none \
    -chardev "file,id=console,path=$(qpath "$here/$VM_CONSOLE"),append=on" -serial chardev:console "$@"
else
  # the monitor stays multiplexed on stdio next to the FIFO monitor (Ctrl-a x, Ctrl-a c)
  set -- -nographic -chardev "stdio,id=console,mux=on,logfile=$(qpath "$here/$VM_CONSOLE"),logappend=on" \
    -serial chardev:console -mon chardev=console,mode=readline "$@"
fi
# A guest reboot ends QEMU; run.sh starts it again with the first-boot rule decided afresh,
# as Flatcar's GRUB does with its flag file (QEMU would keep a first boot's -append).
set -- -no-reboot "$@"

if [ "$mode" = print ]; then
  decide_boot
  echo "# VM $name: $boot_rule"
  quoted_net=$(sh_word "$net")
  printf 'mkdir -p %s && cd %s && ' "$quoted_net" "$quoted_net"  # QEMU finds the switch as ./switch
  # the cluster switch, started if none runs (cluster.sh down stops it once no VM uses it)
  switch=$(sh_word "$NET_SWITCH") switch_pid=$(sh_word "$NET_SWITCH_PID")
  # shellcheck disable=SC2016  # expanded where the printed line runs
  printf '{ kill -0 "$(cat %s 2>/dev/null)" 2>/dev/null || { rm -rf %s && %s; }; } && ' "$switch_pid" "$switch" \
    "vde_switch --sock $switch --pidfile \"\$PWD\"/$switch_pid --daemon"
  vm_qemu print_command "$@"
  exit 0
fi

# --- checks, before anything is touched ----------------------------------------------------
command -v "$qemu" >/dev/null 2>&1 ||
  die "$qemu not found: install it (apt-get install $qemu_package) or set LEANVM_QEMU"
refuse_if_running
# One run.sh at a time per VM (fd 8 on run.lock, never inherited by QEMU): a run.sh that was
# killed leaves a keeper that stops its QEMU and clears up; a start waits for it.
exec 8>"$here/$VM_RUN_LOCK"
flock -w 15 8 || die "VM $name is starting or stopping in another run.sh; try again"
refuse_if_running
if [ -f "$here/$VM_QEMU_PID" ]; then  # not this VM's QEMU (refuse_if_running): left by a QEMU that died
  warn "removed a stale qemu.pid (pid $(cat "$here/$VM_QEMU_PID") is not VM $name's QEMU)"
  rm -f "$here/$VM_QEMU_PID"
fi
# A restore that a SIGKILL ended: the VM's own disks first.
if [ "$disks_are_mine" = yes ]; then recover_disks_locked "$here" run.sh; fi
check_ports "$name" "$host_ports"

# --- the run: QEMU never outlives this script ---------------------------------------------
# QEMU runs as a child that this script waits for, so that a signal reaches the traps at
# once: SIGTERM, SIGINT and SIGHUP are passed on to QEMU as SIGTERM (QEMU's clean exit:
# disks flushed), and the script clears up once QEMU is gone. SIGKILL cannot be caught:
# QEMU then gets SIGTERM from the kernel (setpriv --pdeathsig, util-linux) and a keeper
# process clears up. The traps are set before a restore swaps any disk.

# What a run holds: the monitor FIFOs, a pid file QEMU did not remove, the switch entry, and
# (a restore that was not kept: interrupted, or its QEMU stopped first) the disks it swapped.
release_vm() {
  rm -f "$here/$VM_MONITOR.in" "$here/$VM_MONITOR.out" "$here/$VM_RESUMED" "$here/$VM_RESTORED" "$here/$VM_QMP"
  running_pid "$here" >/dev/null || rm -f "$here/$VM_QEMU_PID"
  if [ -n "$resume" ] && old_disks_kept "$here"; then
    put_old_disks_back "$here"
    printf 'run.sh: VM %s: its restore from snapshot %s ended before it was kept: its own disks are as they were\n' \
      "$name" "$resume" >&2
  fi
  [ -z "$resume" ] || discard_snapshot_disks "$here"
  if [ "$cluster_net" = true ]; then with_net_lock leave_switch; fi
}

# SIGTERM to QEMU, and SIGKILL if it is still there after $1 seconds.
stop_qemu_child() {
  kill -TERM "$qemu_child" 2>/dev/null || return 0
  tries=0
  while alive "$qemu_child" && [ "$tries" -lt $(($1 * 10)) ]; do sleep 0.1; tries=$((tries + 1)); done
  kill -KILL "$qemu_child" 2>/dev/null || true
}

# Runs beside the script (holding its run.lock): once the script is gone without clearing up
# (it was killed with SIGKILL), stops QEMU if the parent-death signal did not, and clears up.
keeper() {
  trap '' INT HUP TERM
  while alive "$launcher"; do sleep 1 8>&-; done
  qemu_child=$(running_pid "$here" || true)
  [ -z "$qemu_child" ] || stop_qemu_child 10
  release_vm
}

# A signal to run.sh: remember the exit status it gives ($1) and stop QEMU cleanly.
on_signal() {
  caught=$1
  [ -z "$qemu_child" ] || kill -TERM "$qemu_child" 2>/dev/null || true
}
caught="" qemu_child=""
trap 'on_signal 129' HUP
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
exec 7<&0  # an asynchronous command's stdin would be /dev/null: QEMU keeps this one
launcher=$$
keeper </dev/null >/dev/null 2>&1 7<&- &
keeper_pid=$!
leave() {
  trap - EXIT INT TERM HUP
  kill -KILL "$keeper_pid" 2>/dev/null || true
  wait "$keeper_pid" 2>/dev/null || true
  release_vm
}
trap leave EXIT
if [ -n "$restore" ]; then put_snapshot_disks_back; fi
if [ -n "$caught" ]; then exit "$caught"; fi

# --- start ------------------------------------------------------------------------------
decide_boot
if [ "$cluster_net" = true ]; then with_net_lock ensure_switch || exit 1; fi
# QEMU finds the switch as ./switch and its QMP socket as ../vms/NAME/qmp.sock: short socket
# paths, wherever out/ is
mkdir -p "$net" && cd "$net" || exit 1
rm -f "$here/$VM_MONITOR.in" "$here/$VM_MONITOR.out" "$here/$VM_FORCED_STOP" "$here/$VM_BOOT_FAILED"
mkfifo "$here/$VM_MONITOR.in" "$here/$VM_MONITOR.out"
: >"$here/$VM_CONSOLE"

if command -v setpriv >/dev/null 2>&1; then
  runner="exec setpriv --pdeathsig TERM --"
else
  runner="exec"  # no setpriv (e.g. macOS): the keeper stops QEMU within a second
fi
# True if the guest of the launch whose console began at byte $1 of console.log rebooted
# (the kernel's last words: "reboot: Restarting system", not "reboot: Power down").
guest_rebooted() {
  tail -c +"$(($1 + 1))" "$here/$VM_CONSOLE" 2>/dev/null |
    grep -a -e 'reboot: Restarting system' -e 'reboot: Power down' | tail -n 1 | grep -q 'Restarting system'
}

# True if the QEMU whose console began at byte $1 of console.log failed under a KVM that
# LEANVM_ACCEL=auto chose before its guest printed anything (and nobody stopped it).
kvm_failed() {
  [ -z "$launched_incoming" ] && [ "$accel" = kvm ] && [ "${LEANVM_ACCEL:-auto}" = auto ] && [ ! -f "$here/$VM_FORCED_STOP" ] &&
    [ "$(wc -c <"$here/$VM_CONSOLE")" -le "$1" ]
}

# Watch the console of the launch that began at byte $1 while QEMU (pid $2) runs: a failed
# boot (Ignition's failure, or the prompt of Flatcar's emergency target, which reboots after
# 300 s: bootengine dracut/99emergency-timeout) is written to boot-failed and QEMU stopped,
# rather than waited out and started again, a first boot once more, in a loop.
watch_boot() (
  while kill -0 "$2" 2>/dev/null; do
    if line=$(tail -c +"$(($1 + 1))" "$here/$VM_CONSOLE" 2>/dev/null |
        grep -a -m 1 -e 'Ignition has failed' -e 'Press Enter for emergency shell'); then
      printf '%s\n' "$line" | tr -d '\r' | sed 's/[[:space:]]*$//' >"$here/$VM_BOOT_FAILED"
      kill -TERM "$2" 2>/dev/null
      exit 0
    fi
    sleep 1
  done
)

# A restored QEMU (pid $1) once it has loaded the snapshot: resumed, said in resumed, and
# (run.sh --restore; cluster.sh restore does it once every VM runs) the disks from before
# dropped. It runs in this script, not beside it, so that a signal (caught) stops it between
# two steps and no other process drops or puts back a disk. False if QEMU did not resume.
resume_guest() {
  # QEMU closes the memory file once it has loaded it (its state set, paused) or given up
  # (it exits): on Linux, seen in /proc without asking the monitor; then the monitor says which.
  tries=0
  while [ -e "/proc/$1/fdinfo/$MEMORY_FD" ] && [ "$tries" -lt 1500 ] && [ -z "$caught" ]; do
    sleep 0.02
    tries=$((tries + 1))
  done
  # QEMU says "paused (inmigrate)" while it loads, then "paused" (or "running")
  tries=0
  until [ -z "$caught" ] && alive "$1" && resumed_status=$(hmp "$here" "info status" '^VM status: ' 2) &&
      { [ "$resumed_status" = "VM status: paused" ] || [ "$resumed_status" = "VM status: running" ]; }; do
    [ -z "$caught" ] && alive "$1" && [ "$tries" -lt 300 ] || return 1
    sleep 0.05
    tries=$((tries + 1))
  done
  hmp "$here" "cont
info status" '^VM status: running' 10 >/dev/null && [ -z "$caught" ] || return 1
  if [ "$disks_are_mine" = yes ]; then drop_old_disks "$here"; fi
  echo "$1" >"$here/$VM_RESUMED"
}

# Set the clock of a restored guest (QEMU pid $1; it lives at the moment it was saved) over
# ssh; one line, in restored as well.
set_restored_clock() (
  clock="its clock could not be set over ssh (sudo date): it runs behind by the time since the snapshot"
  tries=0
  while [ "$tries" -lt 30 ] && alive "$1"; do
    if ssh_to_vm "$out" "$ssh_port" "$name" sudo date -u -s "@$(date +%s)" </dev/null >/dev/null 2>&1; then
      clock="its clock set to this host's over ssh"
      break
    fi
    tries=$((tries + 1))
    sleep 1
  done
  alive "$1" || exit 0
  printf 'run.sh: VM %s restored from snapshot %s and running; %s\n' "$name" "$resume" "$clock" |
    tee "$here/$VM_RESTORED" >&2
)

# A restore whose QEMU ended before it ran the snapshot: the disks from before go back.
undo_restore() {
  old_disks_kept "$here" || return 0
  put_old_disks_back "$here"
  qemu_error="its error is above"  # (in the foreground, QEMU's own words are on the terminal)
  if [ "$mode" = supervise ]; then qemu_error=$(grep -a -m 1 -e 'qemu-system' "$here/$VM_RUN_LOG" || echo "see run.log"); fi
  printf 'run.sh: VM %s: QEMU could not load snapshot %s (%s): its disks are as they were\n' \
    "$name" "$resume" "$qemu_error" >&2
  status=1
}

while :; do
  if [ -n "$caught" ]; then exit "$caught"; fi  # a signal between two launches
  offset=$(wc -c <"$here/$VM_CONSOLE")
  launched_incoming=$incoming resumed=""
  if [ -n "$incoming" ]; then
    vm_qemu "$runner" -incoming "$incoming" "$@" <&7 7<&- 8>&- 6<"$memory_file" &  # 6: MEMORY_FD (sh takes no variable there)
  else
    vm_qemu "$runner" "$@" <&7 7<&- 8>&- &
  fi
  qemu_child=$!
  watch_boot "$offset" "$qemu_child" </dev/null >/dev/null 2>&1 7<&- 8>&- &
  watcher=$!
  if [ -n "$incoming" ]; then
    incoming=""
    if resume_guest "$qemu_child"; then
      resumed=yes
      set_restored_clock "$qemu_child" </dev/null 7<&- 8>&- &
    else
      kill -TERM "$qemu_child" 2>/dev/null || true  # (a QEMU that could not load it has ended)
    fi
  fi
  while :; do
    status=0
    # a signal caught before qemu_child was set stopped nothing: do not wait for QEMU then
    [ -n "$caught" ] || wait "$qemu_child" || status=$?
    [ -z "$caught" ] || break
    kill -0 "$qemu_child" 2>/dev/null || break  # QEMU ended and was reaped
  done
  if [ -n "$caught" ]; then
    stop_qemu_child 10
    wait "$qemu_child" 2>/dev/null || true
    exit "$caught"
  fi
  kill "$watcher" 2>/dev/null || true
  if [ -n "$launched_incoming" ] && [ -z "$resumed" ] && old_disks_kept "$here"; then
    undo_restore
    break
  fi
  if [ -f "$here/$VM_BOOT_FAILED" ]; then
    printf 'run.sh: VM %s: its boot failed ("%s"): stopped instead of started again; see %s\n' \
      "$name" "$(cat "$here/$VM_BOOT_FAILED")" "$here/$VM_CONSOLE" >&2
    status=1
    break
  fi
  if [ "$status" -ne 0 ] && kvm_failed "$offset"; then
    qemu_error="exit status $status"  # (in the foreground, QEMU's own words are on the terminal)
    if [ "$mode" = supervise ]; then qemu_error=$(grep -a -m 1 -e 'qemu-system' "$here/$VM_RUN_LOG" || echo "$qemu_error"); fi
    printf 'run.sh: VM %s: QEMU %s (%s): starting it under TCG (LEANVM_ACCEL=tcg skips the KVM try)\n' \
      "$name" "$KVM_FALLBACK" "$qemu_error" >&2
    use_accel tcg
    continue
  fi
  if [ -f "$here/$VM_FORCED_STOP" ] || [ "$status" -ne 0 ] || ! guest_rebooted "$offset"; then break; fi
  printf 'run.sh: VM %s rebooted: starting it again\n' "$name" >&2
  decide_boot
done
if [ -f "$here/$VM_FORCED_STOP" ]; then  # QEMU exits 0 after a monitor quit or a SIGTERM
  printf 'run.sh: VM %s was stopped by force: %s\n' "$name" "$(cat "$here/$VM_FORCED_STOP")" >&2
  rm -f "$here/$VM_FORCED_STOP"
  [ "$status" -ne 0 ] || status=143
fi
exit "$status"
