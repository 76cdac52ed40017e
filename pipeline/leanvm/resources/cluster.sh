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
  up [--wait [SECONDS]] [NAME...]
                         start every VM (or those named) detached (console in
                         vms/NAME/console.log); with --wait, return once their sshd answers
                         (default 300 s)
  down [NAME...]         power every VM (or those named) off (ACPI button, pressed every 5 s),
                         then stop QEMU after LEANVM_STOP_TIMEOUT seconds (60)
  status                 which VMs run (here or under libvirt), their pids and ssh ports
  console NAME           follow a detached VM's serial console (Ctrl-c stops following)
  snapshot [--stop] [NAME...] SNAP
                         save every running VM (or those named) into snapshots/SNAP: memory,
                         devices and disks at one paused instant; then resume them (or stop
                         them, with --stop) and set their clocks over ssh
  restore [--wait [SECONDS]] [NAME...] SNAP
                         bring the VMs of snapshots/SNAP (or those named) back running as
                         they were saved; with --wait, return once their sshd answers and
                         their clocks are set
  ssh NAME [-- CMD...]   ssh into a VM as LEANVM_SSH_USER (default core) with the cluster key
                         (ssh/id_ed25519); the remote command's exit status is passed through
  monitor NAME [COMMAND] send a QEMU monitor command ('info status', 'info block', ...) to a
                         running VM through its QMP socket and print the answer; without
                         COMMAND, one command a line from stdin (runs python3, or LEANVM_PYTHON)
  help                   this text
LEANVM_ACCEL and LEANVM_APPEND are passed on to each run.sh.
EOF
}

# ssh to VM $1 with the cluster key (ssh_to_vm); the rest are ssh's command.
vm_ssh() {
  vm=$1
  shift
  port=$(ssh_port "$vm")
  [ -n "$port" ] || die "VM $vm has no recorded ssh port: run doit"
  [ -r "$out/$OUT_SSH/$SSH_KEY" ] || die "no cluster key $out/$OUT_SSH/$SSH_KEY: run doit"
  ssh_to_vm "$out" "$port" "$vm" "$@"
}

# Seconds after which a VM that printed nothing on its serial console under KVM counts as
# hung: a KVM guest prints its first kernel line within a second or two.
KVM_SILENCE=20

# Wait until every VM's sshd answers, at most $1 seconds; one line naming those that did
# not. Fails at once if a VM's QEMU has ended, and deals with a KVM that hangs (kvm_hung).
wait_for_ssh() {
  started=$(date +%s)
  deadline=$((started + $1))
  pending=$selected
  while [ -n "$pending" ]; do
    still=""
    for vm in $pending; do
      vm_ssh "$vm" true </dev/null >/dev/null 2>&1 && continue
      if ! vm_active "$vm"; then
        stop_switch_if_unused
        if [ -f "$out/$OUT_VMS/$vm/$VM_BOOT_FAILED" ]; then
          die "VM $vm: its boot failed (\"$(cat "$out/$OUT_VMS/$vm/$VM_BOOT_FAILED")\"): see $out/$OUT_VMS/$vm/$VM_CONSOLE"
        fi
        die "VM $vm stopped before its sshd answered: see $out/$OUT_VMS/$vm/$VM_CONSOLE"
      fi
      still="$still $vm"
    done
    pending=${still# }
    [ -z "$pending" ] && break
    if [ "$accel" = kvm ] && [ $(($(date +%s) - started)) -ge "$KVM_SILENCE" ] && silent "$pending"; then
      kvm_hung "$pending"
      started=$(date +%s)
      deadline=$((started + $1))
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "no sshd answered within $1 s on:$still"
    sleep 0.5
  done
  echo "every VM answers ssh"
}

# True if no VM named in $1 has printed anything on its serial console.
silent() {
  for vm in $1; do [ ! -s "$out/$OUT_VMS/$vm/$VM_CONSOLE" ] || return 1; done
}

# The VMs in $1 printed nothing under KVM: KVM hangs on this machine (nested virtualisation
# does that). Under LEANVM_ACCEL=auto they are stopped and started again under TCG; with
# LEANVM_ACCEL=kvm they are stopped and the wait fails. One line either way.
kvm_hung() {
  # shellcheck disable=SC2086  # one word per VM name
  force_stop $1
  why="no VM printed anything on its console within ${KVM_SILENCE} s under KVM: KVM hangs on this machine (nested virtualisation?)"
  if [ "${LEANVM_ACCEL:-auto}" != auto ]; then
    wait_for_launchers
    stop_switch_if_unused
    die "$why; the VMs are stopped: start them with LEANVM_ACCEL=tcg"
  fi
  echo "cluster.sh: $why; starting them under TCG (LEANVM_ACCEL=tcg skips the KVM try)" >&2
  accel=tcg
  for vm in $1; do
    LEANVM_ACCEL=tcg "$out/$OUT_VMS/$vm/$VM_RUN_SH" --detach || die "VM $vm did not start under TCG"
  done
}

vms() { vms_in "$out"; }

# The pid of VM $1's QEMU, if it runs.
vm_pid() { running_pid "$out/$OUT_VMS/$1"; }

# True while VM $1's run.sh holds its run.lock: from before QEMU starts until it has
# cleared up, across the relaunch after a guest reboot (when no QEMU runs for a moment).
launcher_active() { ! flock -n "$out/$OUT_VMS/$1/$VM_RUN_LOCK" true 2>/dev/null; }

# True if VM $1 runs: its QEMU, or its run.sh between two launches.
vm_active() { vm_pid "$1" >/dev/null || launcher_active "$1"; }

# VM $1's ssh port, from the identity doit recorded for it (out/state/vms/NAME.env).
ssh_port() (
  [ -r "$out/$OUT_VALUES/$1.env" ] || exit 0
  # shellcheck source=/dev/null disable=SC2154  # ssh_port comes from the file
  . "$out/$OUT_VALUES/$1.env" && echo "$ssh_port"
)

check_vm_exists() { [ -x "$out/$OUT_VMS/$1/$VM_RUN_SH" ]; }
check_vm() { check_vm_exists "$1" || die "no VM named '$1' in $out/$OUT_VMS"; }

# Refuse, in one line, a VM named twice to command $1 (the rest are the names).
named_once() {
  named_once_command=$1 named_once_seen=" "
  shift
  for named_once_vm; do
    case $named_once_seen in
      *" $named_once_vm "*) die "$named_once_command: VM $named_once_vm is named twice; name each VM once" ;;
    esac
    named_once_seen="$named_once_seen$named_once_vm "
  done
}

# Send monitor command $1 to each VM named after it through its FIFO, all at once, never
# blocking on a dead QEMU (a writer that cannot open the FIFO is killed after a second).
monitor() {
  command=$1
  shift
  writers=""
  for vm; do
    vm_pid "$vm" >/dev/null || continue
    printf '%s\n' "$command" >"$out/$OUT_VMS/$vm/$VM_MONITOR.in" &
    writers="$writers $!"
  done
  [ -n "$writers" ] || return 0
  tries=0
  while [ "$tries" -lt 10 ] && for writer in $writers; do alive "$writer" && break; done; do
    sleep 0.1
    tries=$((tries + 1))
  done
  for writer in $writers; do
    kill "$writer" 2>/dev/null || true
    wait "$writer" 2>/dev/null || true
  done
}

up() {
  recover_snapshots
  failed=0 not_started=""
  for vm in $selected; do
    clear_stale_pid "$out/$OUT_VMS/$vm"
    if pid=$(vm_pid "$vm"); then
      echo "$vm: already running (pid $pid)"
    elif launcher_active "$vm"; then
      echo "$vm: already starting (its run.sh runs; QEMU is not up yet, or restarts after a guest reboot)"
    elif "$out/$OUT_VMS/$vm/$VM_RUN_SH" --detach; then
      echo "$vm: started (pid $(vm_pid "$vm" || echo -), ssh 127.0.0.1:$(ssh_port "$vm"))"
    else
      failed=1 not_started="$not_started $vm"
    fi
  done
  return "$failed"
}

still_running() {
  for vm in $selected; do vm_active "$vm" && echo "$vm"; done
  return 0
}

# The cluster network's switch stops once no VM of this out/ runs or starts (under the
# lock that every run.sh takes to start or leave it).
stop_switch_if_unused() {
  [ -d "$out/$OUT_NET" ] || return 0
  (
    flock 9 || exit 1
    for vm in $(vms); do vm_pid "$vm" >/dev/null && exit 0; done
    for entry in "$out/$OUT_NET/$NET_USERS"/*; do
      [ -e "$entry" ] || continue
      pid=$(cat "$entry" 2>/dev/null) && alive "$pid" && exit 0
      rm -f "$entry"
    done
    stop_switch "$out/$OUT_NET"
  ) 9>"$out/$OUT_NET/$NET_LOCK"
}

# Wait (up to 10 s) for the run.sh of each VM whose QEMU has ended: it clears up then.
wait_for_launchers() {
  tries=0
  while [ "$tries" -lt 100 ]; do
    busy=""
    for entry in "$out/$OUT_NET/$NET_USERS"/*; do
      [ -e "$entry" ] || continue
      vm_pid "${entry##*/}" >/dev/null && continue  # still running: not ending
      if pid=$(cat "$entry" 2>/dev/null) && alive "$pid"; then busy=1; fi
    done
    [ -n "$busy" ] || return 0
    sleep 0.1
    tries=$((tries + 1))
  done
}

# Stop the QEMUs of the VMs named: monitor quit, then SIGTERM, then SIGKILL. Then wait (up
# to 15 s in all) for each VM's run.sh to end: one that was between two launches (a guest
# reboot) starts QEMU again, which is stopped too; run.sh finds forced-stop then and ends.
force_stop() {
  [ $# -gt 0 ] || return 0
  monitor quit "$@"
  for signal in TERM KILL; do
    tries=0
    while [ "$tries" -lt 10 ] && for vm; do vm_pid "$vm" >/dev/null && break; done; do
      sleep 0.1
      tries=$((tries + 1))
    done
    for vm; do
      if pid=$(vm_pid "$vm"); then kill "-$signal" "$pid" 2>/dev/null || true; fi
    done
  done
  tries=0
  for vm; do
    while launcher_active "$vm" && [ "$tries" -lt 150 ]; do
      if pid=$(vm_pid "$vm"); then kill -TERM "$pid" 2>/dev/null || true; fi
      sleep 0.1
      tries=$((tries + 1))
    done
  done
}

# Press the power button of the VMs named; at the third press (10 s without a power-off)
# also ask each over ssh, as its user would (`sudo systemctl poweroff`): a kernel may ignore
# the button (Flatcar's arm64 kernel has no KEYBOARD_GPIO for the virt machine's GPIO key).
# (power_off runs this in one subshell, so presses counts across its calls.)
presses=0
press_power_button() {
  monitor system_powerdown "$@"
  presses=$((presses + 1))
  [ "$presses" -eq 3 ] || return 0
  for vm; do
    vm_ssh "$vm" sudo systemctl poweroff </dev/null >/dev/null 2>&1 &
  done
}

down() {
  timeout=$(stop_timeout) || exit 1
  recover_snapshots  # a VM an interrupted snapshot left paused would not see the button
  for vm in $selected; do clear_stale_pid "$out/$OUT_VMS/$vm"; done
  power_off still_running press_power_button "$timeout"
  stubborn=$(still_running)
  for vm in $stubborn; do
    echo "$vm: did not power off within ${timeout}s; stopping QEMU"
    echo "cluster.sh down: no power-off within ${timeout}s" >"$out/$OUT_VMS/$vm/$VM_FORCED_STOP"
  done
  # shellcheck disable=SC2086  # one word per VM name
  force_stop $stubborn
  wait_for_launchers
  stop_switch_if_unused
  for vm in $selected; do
    rm -f "$out/$OUT_VMS/$vm/$VM_MONITOR.in" "$out/$OUT_VMS/$vm/$VM_MONITOR.out"
    echo "$vm: stopped"
  done
}

# --- snapshots ---------------------------------------------------------------------------
snapshots=$out/$OUT_SNAPSHOTS
snap=""

joined() { echo "$@"; }  # the words given, on one line

# Milliseconds since the epoch (whole seconds where date has no %N, as on macOS); and $1 ms
# as seconds with one decimal.
now_ms() {
  now=$(date +%s%N)
  case $now in *N) echo $(($(date +%s) * 1000)) ;; *) echo $((now / 1000000)) ;; esac
}
seconds() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }

# The value of option $2 on the command line of process $1 (the word after it).
qemu_option() { tr '\0' '\n' <"/proc/$1/cmdline" | awk -v opt="$2" 'found { print; exit } $0 == opt { found = 1 }'; }

# Set the clocks of the VMs named to this host's time over ssh (a paused or restored guest
# lives in the past), as the cluster key's user with sudo; one line each that could not.
set_clocks() {
  for vm; do
    vm_ssh "$vm" sudo date -u -s "@$(date +%s)" </dev/null >/dev/null 2>&1 ||
      echo "cluster.sh: warning: could not set VM $vm's clock over ssh (sudo date); it runs behind by the time it was paused" >&2
  done
}

# Resume (or, with --stop, quit) the VMs named that a snapshot paused.
release_paused() {
  for vm; do
    if [ "$stop_after" = yes ]; then
      pid=$(vm_pid "$vm") || continue
      printf 'quit\n' >"$out/$OUT_VMS/$vm/$VM_MONITOR.in" &
      tries=0
      while alive "$pid" && [ "$tries" -lt 100 ]; do sleep 0.05; tries=$((tries + 1)); done
      kill "$!" 2>/dev/null || true
    else
      hmp "$out/$OUT_VMS/$vm" "cont
info status" '^VM status: ' 10 >/dev/null || true
    fi
  done
}

# Resume the VM in directory $1 that a snapshot left paused: the migration it may still run
# cancelled and waited out (a cont during one would leave it paused once it completes), then
# cont; false if it does not run afterwards.
resume_paused() (
  hmp "$1" "migrate_cancel
info status" '^VM status: ' 5 >/dev/null || exit 1
  tries=0
  while [ "$tries" -lt 100 ] && state=$(hmp "$1" "info migrate
info status" '^(Migration|VM) status: ' 2); do
    case $state in *" setup" | *" active" | *" cancelling" | *" device" | *" pre-switchover") ;; *) break ;; esac
    sleep 0.1
    tries=$((tries + 1))
  done
  hmp "$1" "cont
info status" '^VM status: running$' 10 >/dev/null
)

# A snapshot whose command was killed (its owner's pid gone) left snapshots/.SNAP.part: the
# VMs it paused are resumed and the directory goes; one line.
recover_snapshots() {
  for leftover in "$snapshots"/.*.part "$snapshots"/.restoring-*; do
    [ -d "$leftover" ] || continue
    ! alive "$(cat "$leftover/$SNAPSHOT_OWNER" 2>/dev/null || true)" || continue
    case $leftover in
      */.restoring-*) rm -rf "$leftover"; continue ;;
    esac
    resumed=""
    for vm in $(cat "$leftover/$SNAPSHOT_PAUSED" 2>/dev/null || true); do
      if vm_pid "$vm" >/dev/null && resume_paused "$out/$OUT_VMS/$vm"; then resumed="$resumed $vm"; fi
    done
    rm -rf "$leftover" "$leftover.B3SUMS"
    leftover=${leftover##*/.}
    echo "cluster.sh: snapshot ${leftover%.part} had been interrupted: its partial files were removed${resumed:+, and VMs$resumed resumed}" >&2
  done
}

# A snapshot that failed: the VMs run on (or stop, with --stop), nothing is left; one line.
snapshot_failed() {
  # shellcheck disable=SC2086  # one word per VM name
  release_paused $selected
  rm -rf "$part" "$part.B3SUMS"
  die "snapshot $snap: $*; the VMs were resumed and nothing was kept"
}

# A signal ($1: the exit status it gives) while VMs may be paused: each is resumed (its
# migration cancelled first), nothing is kept; one line.
snapshot_interrupted() {
  trap '' INT TERM HUP
  for vm in $selected; do
    vm_pid "$vm" >/dev/null && resume_paused "$out/$OUT_VMS/$vm" ||
      echo "cluster.sh: warning: VM $vm could not be resumed; see $out/$OUT_VMS/$vm/$VM_RUN_LOG" >&2
  done
  rm -rf "$part" "$part.B3SUMS"
  echo "cluster.sh: snapshot $snap interrupted: the VMs run on as before and nothing was kept" >&2
  exit "$1"
}

# Save VM $1 (paused) into $part/$1: its RAM and devices (QEMU's migration to a file, not
# throttled), its root and OEM disks as they are at that instant, and its values. Only a
# migration this command started and saw complete counts: its memory file is there.
save_vm() {
  dir=$out/$OUT_VMS/$1
  pid=$(vm_pid "$1") || snapshot_failed "VM $1 stopped"
  mkdir -p "$part/$1"
  status=$(hmp "$dir" "migrate_set_parameter max-bandwidth 64G
migrate $(hmp_string "exec:cat > $(sh_word "$part/$1/$SNAPSHOT_MEMORY")")
info migrate" '^(Migration status: |Error: )' 600) ||
    snapshot_failed "VM $1's QEMU did not answer on its monitor"
  [ "$status" = "Migration status: completed" ] || snapshot_failed "QEMU could not save VM $1 ($status)"
  [ -s "$part/$1/$SNAPSHOT_MEMORY" ] || snapshot_failed "QEMU could not save VM $1 (it wrote no memory file)"
  for disk in $RESTORED_DISKS; do
    cp --sparse=always --reflink=auto "$dir/$disk" "$part/$1/$disk" || snapshot_failed "cannot copy $dir/$disk"
  done
  cp "$out/$OUT_VALUES/$1.env" "$part/$1/$SNAPSHOT_VALUES"
  cpu=$(qemu_option "$pid" -cpu)
  {
    echo "$1.machine=$(qemu_option "$pid" -machine)"
    echo "$1.accel=$(qemu_option "$pid" -accel | sed 's/,.*//')"
    echo "$1.cpu=$cpu"
    [ "$cpu" != host ] || echo "$1.cpu_model=$(host_cpu_model)"
    echo "$1.memory=$(qemu_option "$pid" -m)"
    echo "$1.append=$(qemu_option "$pid" -append)"
    echo "$1.qemu_version=$("$(readlink "/proc/$pid/exe")" --version | head -n 1)"
  } >>"$part/$SNAPSHOT_MANIFEST.vms"
}

# Pause VM $1 for the snapshot: "VM status: paused" exactly (a VM that an interrupted snapshot
# left "paused (postmigrate)" cannot be migrated again: it is resumed first, said in one line).
pause_vm() {
  dir=$out/$OUT_VMS/$1
  state=$(hmp "$dir" "info status" '^VM status: ' 10) || snapshot_failed "VM $1's QEMU did not answer on its monitor"
  case $state in
    "VM status: running" | "VM status: paused") ;;
    *)
      resume_paused "$dir" || snapshot_failed "VM $1 is stuck in '$state'"
      echo "cluster.sh: VM $1 was left ${state#VM status: } by an interrupted snapshot: resumed it first" >&2 ;;
  esac
  state=$(hmp "$dir" "stop
info status" '^VM status: ' 10) || snapshot_failed "VM $1's QEMU did not pause"
  [ "$state" = "VM status: paused" ] || snapshot_failed "VM $1's QEMU did not pause ($state)"
}

snapshot() {
  check_snapshot_name "$snap"
  ! check_vm_exists "$snap" || die "snapshot: '$snap' is a VM's name; give the snapshot's name last" \
    "(usage: cluster.sh snapshot [--stop] [NAME...] SNAP), such as: $0 snapshot $snap ready"
  [ ! -e "$snapshots/$snap" ] || die "snapshot $snap exists ($snapshots/$snap): remove it or pick another name"
  command -v b3sum >/dev/null 2>&1 || die "b3sum not found: install it (apt-get install b3sum)"
  recover_snapshots
  for vm in $selected; do
    clear_stale_pid "$out/$OUT_VMS/$vm"
    vm_pid "$vm" >/dev/null || die "VM $vm is not running: a snapshot saves running VMs (start it with $0 up $vm)"
  done
  part=$snapshots/.$snap.part
  rm -rf "$part"
  mkdir -p "$part" || die "cannot make $part"
  echo "$$" >"$part/$SNAPSHOT_OWNER"
  # shellcheck disable=SC2086  # one word per VM name
  joined $selected >"$part/$SNAPSHOT_PAUSED"
  trap 'snapshot_interrupted 129' HUP
  trap 'snapshot_interrupted 130' INT
  trap 'snapshot_interrupted 143' TERM
  snapshot_started=$(now_ms)
  # every VM paused at one instant, so that the cluster is saved as one moment
  for vm in $selected; do pause_vm "$vm"; done
  for vm in $selected; do save_vm "$vm"; done
  # from here on the VMs run on (or stop): the snapshot is completed whatever comes
  trap '' INT TERM HUP
  # shellcheck disable=SC2086  # one word per VM name
  release_paused $selected
  paused=$(($(now_ms) - snapshot_started))
  if [ "$stop_after" = no ]; then
    # shellcheck disable=SC2086  # one word per VM name
    set_clocks $selected &  # while the digests are computed
    clocks=$!
  fi
  rm -f "$part/$SNAPSHOT_OWNER" "$part/$SNAPSHOT_PAUSED"
  {
    echo "# leanvm snapshot (read by cluster.sh restore and run.sh --restore, never sourced)"
    echo "snapshot=$snap"
    echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # shellcheck disable=SC2086  # one word per VM name
    echo "vms=$(joined $selected)"
    cat "$part/$SNAPSHOT_MANIFEST.vms"
  } >"$part/$SNAPSHOT_MANIFEST"
  rm -f "$part/$SNAPSHOT_MANIFEST.vms"
  if ! (cd "$part" && find . -type f | sed 's|^\./||' | sort | xargs b3sum) >"$part.B3SUMS"; then
    rm -rf "$part" "$part.B3SUMS"
    die "snapshot $snap: cannot compute the digests (b3sum)"
  fi
  mv "$part.B3SUMS" "$part/$SNAPSHOT_DIGESTS"
  for vm in $selected; do checked_stat "$part" "$vm" >"$part/.checked-$vm"; done  # as written: no need to read them again
  mv "$part" "$snapshots/$snap"
  if [ "$stop_after" = yes ]; then
    # stopped once each run.sh has cleared up too (it holds run.lock until then): a restore
    # or an up right after finds the VM stopped, not "running"
    for vm in $selected; do
      tries=0
      while vm_active "$vm" && [ "$tries" -lt 300 ]; do sleep 0.05; tries=$((tries + 1)); done
    done
    wait_for_launchers
    stop_switch_if_unused
  else
    wait "$clocks" || true
  fi
  # shellcheck disable=SC2086  # one word per VM name
  echo "snapshot $snap: $(joined $selected) saved in $(seconds "$(($(now_ms) - snapshot_started))") s, paused" \
    "$(seconds "$paused") s ($(du -sh "$snapshots/$snap" | cut -f1) in $snapshots/$snap)"
}

# Put the disks of snapshot $1 back for the VMs in $selected: copied beside each VM's
# disks first, then swapped in; the old ones stay as *.before-restore until every VM runs
# the snapshot (then dropped here), or go back if one does not.
put_back_disks() {
  for vm in $selected; do
    copy_snapshot_disks "$out/$OUT_VMS/$vm" "$1/$vm" || {
      for gone in $selected; do discard_snapshot_disks "$out/$OUT_VMS/$gone"; done
      die "restore $snap: cannot copy the disks of $1/$vm; every VM's disks are as they were"
    }
  done
  for vm in $selected; do
    swap_in_snapshot_disks "$out/$OUT_VMS/$vm" && continue
    for gone in $selected; do put_old_disks_back "$out/$OUT_VMS/$gone"; done
    die "restore $snap: cannot swap in the disks of $1/$vm; every VM's disks are as they were"
  done
}

# The restore failed: stop what started; once each VM's run.sh has cleared up (putting its
# disks from before back), any disk left swapped goes back too.
undo_restore() {
  # shellcheck disable=SC2086  # one word per VM name
  force_stop $selected
  for vm in $selected; do flock -w 30 "$out/$OUT_VMS/$vm/$VM_RUN_LOCK" true || true; done
  wait_for_launchers
  stop_switch_if_unused
  for vm in $selected; do recover_disks "$out/$OUT_VMS/$vm" cluster.sh 2>/dev/null; done
  die "restore $snap: $*; every VM's disks are as they were before"
}

restore() {
  check_snapshot_name "$snap"
  dir=$snapshots/$snap
  [ -r "$dir/$SNAPSHOT_MANIFEST" ] || die "no snapshot $snap in $snapshots: list them with ls $snapshots"
  [ -n "$selected" ] || selected=$(manifest_value "$dir/$SNAPSHOT_MANIFEST" vms)
  # shellcheck disable=SC2086  # one word per VM name
  named_once restore $selected
  recover_snapshots
  for vm in $selected; do
    check_vm "$vm"
    clear_stale_pid "$out/$OUT_VMS/$vm"
    ! vm_active "$vm" || die "VM $vm is running: stop it first ($0 down $vm); a restore replaces its disks and memory"
    recover_disks "$out/$OUT_VMS/$vm" cluster.sh
    qemu=$(values_value "$out/$OUT_VALUES/$vm.env" qemu)
    check_snapshot "$dir" "$vm" "$out/$OUT_VALUES/$vm.env" "${LEANVM_QEMU:-$qemu}"
  done
  restore_started=$(date +%s) restore_started_ms=$(now_ms)
  # a signal from here on: the VMs' restores run to their end (their run.sh ignores it), then
  # they are all kept or all undone as below; the wait for ssh is what it cuts short
  caught=""
  trap 'caught=129' HUP
  trap 'caught=130' INT
  trap 'caught=143' TERM
  put_back_disks "$dir"
  # every VM's QEMU started at once; each run.sh says in starts/NAME whether it did
  starts=$out/$OUT_SNAPSHOTS/.restoring-$snap
  rm -rf "$starts"
  mkdir -p "$starts"
  echo "$$" >"$starts/$SNAPSHOT_OWNER"
  for vm in $selected; do
    rm -f "$out/$OUT_VMS/$vm/$VM_RESTORED"
    (
      started=0
      "$out/$OUT_VMS/$vm/$VM_RUN_SH" --detach --resume "$snap" 2>"$starts/$vm.err" || started=$?
      echo "$started" >"$starts/$vm"
    ) &
  done
  until wait; do :; done  # (a trapped signal ends a wait early)
  for vm in $selected; do
    if [ "$(cat "$starts/$vm" 2>/dev/null)" != 0 ]; then
      why=$(tail -n 1 "$starts/$vm.err" 2>/dev/null | sed 's/^run.sh: //')
      rm -rf "$starts"
      undo_restore "VM $vm did not start from the snapshot (${why:-see $out/$OUT_VMS/$vm/$VM_RUN_LOG})"
    fi
  done
  for vm in $selected; do drop_old_disks "$out/$OUT_VMS/$vm"; done  # every VM runs the snapshot: kept
  rm -rf "$starts"
  for vm in $selected; do
    echo "$vm: restored from $snap (pid $(vm_pid "$vm" || echo -), ssh 127.0.0.1:$(ssh_port "$vm"))"
  done
  if [ -n "$caught" ]; then
    echo "cluster.sh: restore $snap interrupted once every VM was restored: they run; not waiting for ssh" >&2
    exit "$caught"
  fi
  trap - INT TERM HUP
  [ -n "$wait_seconds" ] || return 0
  restored_vms=$selected
  # Each run.sh says once its VM runs again and its clock is set over ssh (restored). Only
  # then is ssh tried here: a connection made while QEMU still loads the snapshot waits out
  # TCP's retransmissions (seconds) once the guest runs.
  deadline=$((restore_started + wait_seconds))
  unproven=""
  for vm in $selected; do
    tries=0  # (the VM and the clock looked at every 20th turn: they cost programs, the file none)
    until [ -s "$out/$OUT_VMS/$vm/$VM_RESTORED" ] ||
        { [ $((tries % 20)) = 0 ] && { ! vm_active "$vm" || [ "$(date +%s)" -ge "$deadline" ]; }; }; do
      sleep 0.05
      tries=$((tries + 1))
    done
    # its run.sh set the clock over ssh: its sshd answered
    grep -q 'clock set to this host' "$out/$OUT_VMS/$vm/$VM_RESTORED" 2>/dev/null || unproven="$unproven $vm"
  done
  selected=${unproven# }
  if [ -n "$selected" ]; then
    wait_for_ssh $((deadline > $(date +%s) ? deadline - $(date +%s) : 1))
  else
    echo "every VM answers ssh"
  fi
  selected=$restored_vms
  for vm in $selected; do
    cat "$out/$OUT_VMS/$vm/$VM_RESTORED" 2>/dev/null || echo "$vm: running; its clock was not set yet"
  done
  echo "restored in $(seconds "$(($(now_ms) - restore_started_ms))") s"
}

# --wait [SECONDS] at the start of "$@": sets wait_seconds (300 without a number) and
# wait_words (how many words it took); $1 is the command, for messages.
parse_wait() {
  command=$1
  shift
  wait_seconds="" wait_words=0
  [ "${1-}" = --wait ] || return 0
  wait_seconds=300 wait_words=1
  case ${2-} in
    ''|-*) ;;
    *[!0-9]*)  # a VM name (they start with a letter), or a mistyped number
      case $2 in [0-9]*) die "$command --wait takes a whole number of seconds, not '$2'" ;; esac
      [ -x "$out/$OUT_VMS/$2/$VM_RUN_SH" ] || [ "$command" = restore ] ||
        die "$command --wait: '$2' is neither a number of seconds nor a VM in $out/$OUT_VMS (usage: $command --wait [SECONDS] [NAME...])" ;;
    *) [ "$2" -gt 0 ] || die "$command --wait: SECONDS must be at least 1, not '$2'"
       wait_seconds=$2 wait_words=2 ;;
  esac
}

# "running (libvirt)" if VM $1's libvirt domain runs (out/libvirt.sh, LIBVIRT_DEFAULT_URI).
libvirt_running() {
  [ -r "$out/$OUT_LIBVIRT/$LIBVIRT_ENV" ] && command -v virsh >/dev/null 2>&1 || return 1
  # shellcheck source=/dev/null
  prefix=$(. "$out/$OUT_LIBVIRT/$LIBVIRT_ENV" && echo "$prefix")
  [ "$(virsh -q domstate "$prefix-$1" 2>/dev/null)" = running ]
}

# The host memory of process $1 in MiB, as PSS (a page shared by N processes counts 1/N in
# each), or - where /proc does not tell (not Linux).
pss_mib() { awk '/^Pss:/ { printf "%d MiB", $2 / 1024; found = 1 } END { if (!found) print "-" }' "/proc/$1/smaps_rollup" 2>/dev/null || echo -; }

# One line on KSM (Linux's same-page merging): how much of these VMs' memory it merged, or,
# when it is off, how to turn it on. Nothing where the host has no KSM.
ksm_line() {
  run=$(cat /sys/kernel/mm/ksm/run 2>/dev/null) || return 0
  if [ "$run" != 1 ]; then
    echo "KSM: off: the pages these VMs hold alike (kernel, the /usr they read) are kept once per VM;" \
      "merge them with: echo 1 | sudo tee /sys/kernel/mm/ksm/run (3 idle 256 MiB VMs: 320 -> 227 MiB each," \
      "see README, Memory)"
    return 0
  fi
  pages=0
  for pid in $1; do
    pages=$((pages + $(cat "/proc/$pid/ksm_merging_pages" 2>/dev/null || echo 0)))
  done
  echo "KSM: on: $((pages * $(getconf PAGESIZE) / 1048576)) MiB of these VMs' memory merged with identical pages"
}

status() {
  recover_snapshots
  printf '%-24s %-17s %-8s %-22s %s\n' VM STATE PID SSH "HOST MEMORY (PSS)"
  pids=""
  for vm in $(vms); do
    clear_stale_pid "$out/$OUT_VMS/$vm"
    memory=-
    if pid=$(vm_pid "$vm"); then
      state=running memory=$(pss_mib "$pid") pids="$pids $pid"
    elif launcher_active "$vm"; then
      state=reboot pid=-
    elif libvirt_running "$vm"; then
      state="running (libvirt)" pid=-
    else
      state=stopped pid=-
    fi
    printf '%-24s %-17s %-8s %-22s %s\n' "$vm" "$state" "$pid" "127.0.0.1:$(ssh_port "$vm")" "$memory"
  done
  [ -z "$pids" ] || ksm_line "$pids"
}

# The VMs named in "$@" (each must exist), or every VM.
select_vms() {
  for vm; do check_vm "$vm"; done
  named_once "$command_name" "$@"
  if [ $# -gt 0 ]; then selected=$*; else selected=$(vms); fi
}

command_name=${1-}
case ${1-} in
  up)
    shift
    parse_wait up "$@"
    shift "$wait_words"
    case ${1-} in -*) die "up: unknown option '$1' (usage: cluster.sh up [--wait [SECONDS]] [NAME...])" ;; esac
    select_vms "$@"
    accel=$(resolve_accel "${LEANVM_ACCEL:-auto}") ||
      die "LEANVM_ACCEL must be auto, kvm, hvf or tcg, not '${LEANVM_ACCEL-}'"
    up_status=0
    up || up_status=$?
    if [ -n "$wait_seconds" ]; then
      [ "$up_status" -eq 0 ] || die "VMs that did not start:$not_started; not waiting for ssh"
      wait_for_ssh "$wait_seconds"
    fi
    exit "$up_status" ;;
  snapshot)
    shift
    stop_after=no
    [ "${1-}" != --stop ] || { stop_after=yes; shift; }
    case ${1-} in ''|-*) die "usage: cluster.sh snapshot [--stop] [NAME...] SNAP" ;; esac
    for snap; do :; done  # the last word
    names=""
    while [ $# -gt 1 ]; do names="$names $1"; shift; done
    # shellcheck disable=SC2086  # one word per VM name
    select_vms $names
    snapshot ;;
  restore)
    shift
    parse_wait restore "$@"
    shift "$wait_words"
    case ${1-} in ''|-*) die "usage: cluster.sh restore [--wait [SECONDS]] [NAME...] SNAP" ;; esac
    for snap; do :; done  # the last word
    selected=""
    while [ $# -gt 1 ]; do check_vm "$1"; selected="$selected $1"; shift; done
    selected=${selected# }
    # shellcheck disable=SC2086  # one word per VM name
    named_once restore $selected
    resolve_accel "${LEANVM_ACCEL:-auto}" >/dev/null ||
      die "LEANVM_ACCEL must be auto, kvm, hvf or tcg, not '${LEANVM_ACCEL-}'"
    accel=snapshot  # each VM runs under the accelerator it was saved under: no KVM-hang watch (a restored console stays quiet)
    restore ;;
  help|--help|-h) usage ;;
  down) shift; select_vms "$@"; down ;;
  status) status ;;
  monitor)
    [ $# -ge 2 ] || die "usage: cluster.sh monitor NAME [COMMAND]"
    check_vm "$2"
    python=${LEANVM_PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 || die "$python not found: install python3 (3.9 or newer) or set LEANVM_PYTHON"
    shift
    exec "$python" "$out/$OUT_RUNTIME" monitor "$out" "$@" ;;
  console)
    [ $# -eq 2 ] || die "usage: cluster.sh console NAME"
    check_vm "$2"
    [ -f "$out/$OUT_VMS/$2/$VM_CONSOLE" ] || die "VM $2 has no console.log: start it with 'cluster.sh up'"
    exec tail -n +1 -f "$out/$OUT_VMS/$2/$VM_CONSOLE" ;;
  ssh)
    [ $# -ge 2 ] || die "usage: cluster.sh ssh NAME [-- CMD...]"
    check_vm "$2"
    name=$2
    shift 2
    [ "${1-}" != -- ] || shift
    if ! vm_active "$name" && ! libvirt_running "$name"; then
      die "VM $name is not running: start it with $0 up $name"
    fi
    vm_ssh "$name" "$@" ;;
  '') usage >&2; exit 1 ;;
  *) die "unknown command '$1': see $0 help" ;;
esac
