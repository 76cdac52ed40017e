# shellcheck shell=sh
# leanvm's shared shell functions: copied to out/lib.sh by `doit` and sourced by run.sh,
# cluster.sh and libvirt.sh. The sourcing script defines die() first.

# The functions here run in subshells ( ... ) where they need variables of their own, so
# that they never change the caller's.

# True if process $1 runs: a zombie (killed, not yet reaped by init) does not count. Called
# in polling loops, so it starts no program (read and kill are the shell's own).
alive() {
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
  [ -r /proc/self/stat ] || return 0  # no /proc (macOS): kill -0 is all there is
  read -r alive_stat 2>/dev/null <"/proc/$1/stat" || return 1
  alive_stat=${alive_stat##*) }
  [ "${alive_stat%% *}" != Z ]
}

# True if process $1 is the QEMU of the VM in directory $2: its command line names $2/qemu.pid
# (-pidfile). A QEMU killed with SIGKILL, or a host that lost power, leaves its pid file
# behind, and by then the pid may belong to any process. (Python asks this rule: leanvm.state.vmstate.)
is_vm_qemu() (
  if [ -r "/proc/$1/cmdline" ]; then
    tr '\0' '\n' <"/proc/$1/cmdline" | grep -Fxq -- "$2/$VM_QEMU_PID"
  else  # no /proc (macOS): ps joins the arguments with spaces
    case $(ps -o args= -p "$1" 2>/dev/null) in *"-pidfile $2/$VM_QEMU_PID"*) ;; *) exit 1 ;; esac
  fi
)

# The pid of the QEMU that run.sh started for the VM in directory $1 (its qemu.pid), if it
# runs; false otherwise (no file, a dead process, or one that is not this VM's QEMU).
running_pid() (
  pid=""
  read -r pid 2>/dev/null <"$1/$VM_QEMU_PID" || [ -n "$pid" ] || exit 1
  alive "$pid" && is_vm_qemu "$pid" "$1" && echo "$pid"
)

# Remove the qemu.pid of the VM in directory $1 if it names no QEMU of this VM, and say so;
# only while no run.sh holds the VM's run.lock (a starting QEMU writes the file).
clear_stale_pid() (
  [ -f "$1/$VM_QEMU_PID" ] || exit 0
  running_pid "$1" >/dev/null && exit 0
  exec 8>>"$1/$VM_RUN_LOCK"
  flock -n 8 || exit 0
  running_pid "$1" >/dev/null && exit 0
  stale=$(cat "$1/$VM_QEMU_PID" 2>/dev/null) || exit 0
  rm -f "$1/$VM_QEMU_PID"
  echo "${1##*/}: removed a stale qemu.pid (pid $stale is not this VM's QEMU)" >&2
)

# Refuse, in one line, to start VM $1 if one of its host ports ($2: a list) is taken.
check_ports() {
  for check_ports_port in $2; do  # (not a subshell: die must end the caller)
    if port_in_use "$check_ports_port"; then
      die "VM $1: host port $check_ports_port (127.0.0.1) is already in use; stop what uses it or change the VM's ports"
    fi
  done
}

# This host's architecture in leanvm's names (amd64, arm64): arch_of_machine, in the head
# of out/lib.sh, is written by doit from leanvm's arch table.
host_arch() { arch_of_machine "$(uname -m)"; }

# The accelerator for LEANVM_ACCEL ($1: auto, kvm, hvf or tcg) and a guest of arch $2
# (default: this host's). auto is, for a guest of the host's own arch, KVM on Linux when
# /dev/kvm is usable by this user and HVF on macOS when the kernel offers it; TCG otherwise
# (a guest of another arch is always emulated). Prints kvm, hvf or tcg; fails for any other value.
resolve_accel() {
  case $1 in
    auto)
      if [ "${2:-$(host_arch)}" != "$(host_arch)" ]; then
        echo tcg
      elif [ "$(uname -s)" = Darwin ]; then
        if [ "$(sysctl -n kern.hv_support 2>/dev/null)" = 1 ]; then echo hvf; else echo tcg; fi
      elif [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        echo kvm
      else
        echo tcg
      fi ;;
    kvm|hvf|tcg) echo "$1" ;;
    *) return 1 ;;
  esac
}

# True if something on this host listens on TCP port $1 (any address). (A socket only bound,
# never listening, is not in /proc/net/tcp: QEMU then fails to forward the port, in one line.)
port_in_use() {
  awk -v port="$(printf ':%04X' "$1")" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 }
    END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Stop the cluster network's switch in directory $1 (out/net) and clear what it left (and
# the short directory its switch links to, under a long out/ path); the caller holds $1/lock.
stop_switch() (
  pid=$(cat "$1/$NET_SWITCH_PID" 2>/dev/null || true)
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    tries=0
    while alive "$pid" && [ "$tries" -lt 100 ]; do sleep 0.05; tries=$((tries + 1)); done
  fi
  if [ -L "$1/$NET_SWITCH" ]; then rm -rf "$(short_switch_dir "$1")"; fi
  rm -rf "${1:?}/$NET_SWITCH" "${1:?}/$NET_SWITCH_PID"
)

# The short directory for the switch of out/net directory $1 (its path's checksum in it).
short_switch_dir() {
  printf '%s/leanvm-switch-%s-%s\n' "${TMPDIR:-/tmp}" "$(id -u)" "$(printf '%s' "$1" | cksum | cut -d ' ' -f 1)"
}

# First boot: Ignition runs only while root disk $1 has no /etc/.ignition-result.json, read
# host side with debugfs (read-only), or while it holds /selective-os-reset, which
# flatcar-reset writes to ask for a first boot (flatcar/init bin/flatcar-reset, 32982439;
# Flatcar's GRUB gets /boot/flatcar/first_boot, which a leanvm VM has not). False if the
# profile has no first-boot arguments ($2). Sets first_boot_why (the reason, read by run.sh).
# A disk whose VM stopped uncleanly (kill -9, a host that lost power) needs journal recovery
# and may fail its bitmap checksums until e2fsck runs: unless $3 is "print" (run.sh --print
# writes nothing), its journal is replayed first (e2fsck -E journal_only, so that a file
# only the journal holds counts), and debugfs reads in catastrophic mode (-c: inodes and
# directories, no bitmaps); first_boot_note says so.
# shellcheck disable=SC2034
first_boot() {
  [ -n "$2" ] || return 1
  command -v debugfs >/dev/null 2>&1 || die "debugfs not found: install it (apt-get install e2fsprogs)"
  # (not a subshell: die must end the caller)
  first_boot_note=""
  first_boot_disk=$(read_root_disk "$1") || true
  case $first_boot_disk in
    *needs_recovery*)
      if [ "${3-}" = print ]; then
        first_boot_note=" (its VM stopped uncleanly: run.sh replays the disk's journal before booting, which may change this)"
      else
        replay_journal "$1"
        first_boot_note=" (its VM had stopped uncleanly: the disk's journal was replayed)"
        first_boot_disk=$(read_root_disk "$1") || true
      fi ;;
  esac
  case $first_boot_disk in
    *"/selective-os-reset"*Inode:*)
      first_boot_why="holds /selective-os-reset (flatcar-reset asked for a first boot)"
      return 0 ;;
    *"/etc/.ignition-result.json"*Inode:*)
      first_boot_why="has /etc/.ignition-result.json"
      return 1 ;;
    *"File not found"*)
      first_boot_why="has no /etc/.ignition-result.json"
      return 0 ;;
    *) die "cannot read $1 with debugfs ($(disk_problem "$first_boot_disk")): the disk is damaged;" \
      "repair it with: e2fsck -f '$1'" ;;
  esac
}

# What debugfs says of root disk $1: its features, then each file the first-boot rule reads
# ("debugfs: stat PATH" and "Inode: ..." for a file there, "File not found" for one that is not),
# /selective-os-reset first and only if it is there.
read_root_disk() {
  printf 'features\nstat /selective-os-reset\nstat /etc/.ignition-result.json\n' |
    DEBUGFS_PAGER=__none__ debugfs -c -f - "$1" 2>&1 | sed '/^debugfs: stat \/selective-os-reset$/{
N
/File not found/d
}'
}

# The line of debugfs's output $1 that says what is wrong ("... while opening filesystem").
disk_problem() {
  printf '%s\n' "$1" | grep -m 1 ' while ' || printf '%s\n' "$1" | tail -n 1
}

# Replay root disk $1's journal (e2fsck exits 1 or 2 when it corrected something: fine), or
# one line saying how to repair the disk.
replay_journal() {
  command -v e2fsck >/dev/null 2>&1 || die "e2fsck not found: install it (apt-get install e2fsprogs)"
  replay_status=0
  replay_output=$(e2fsck -E journal_only -p "$1" 2>&1) || replay_status=$?
  if [ "$replay_status" -gt 2 ]; then
    die "$1 needs journal recovery and e2fsck could not replay it ($(printf '%s' "$replay_output" | tail -n 1)):" \
      "repair it with: e2fsck -f '$1'"
  fi
}

# The VMs of the out/ directory $1: each vms/NAME with an executable run.sh (a retired VM
# has run.sh.retired).
vms_in() (
  for dir in "$1/$OUT_VMS"/*/; do
    [ -x "$dir$VM_RUN_SH" ] || continue
    basename "$dir"
  done
)

# LEANVM_STOP_TIMEOUT (seconds, default 60), or one line and failure for anything else.
stop_timeout() (
  timeout=${LEANVM_STOP_TIMEOUT:-60}
  case $timeout in
    ''|*[!0-9]*) die "LEANVM_STOP_TIMEOUT must be a number of seconds, not '$timeout'; nothing was stopped" ;;
  esac
  echo "$timeout"
)

# Press the power button of the VMs that command $1 lists (those still running) with command
# $2 (given their names), every 5 s, until none is left or $3 seconds have passed: a guest
# that is still booting only watches the button once booted (systemd-logind, the mini
# release's init).
power_off() (
  started=$(date +%s) next=0
  while [ -n "$($1)" ]; do
    elapsed=$(($(date +%s) - started))
    [ "$elapsed" -lt "$3" ] || exit 0
    if [ "$elapsed" -ge "$next" ]; then
      # shellcheck disable=SC2046  # one word per VM name
      $2 $($1)
      next=$((elapsed + 5))
    fi
    sleep 0.2  # (looked at five times a second: down returns soon after the last VM is off)
  done
)

# ssh to the VM named $3 whose ssh port is $2, of out/ directory $1, with the cluster key,
# as LEANVM_SSH_USER (default core); the rest are ssh's command. Host keys are kept in
# ssh/known_hosts under the alias leanvm-NAME. ssh runs in out/ssh and is given both files by
# their plain names: ssh splits UserKnownHostsFile at spaces and expands % and ~ in both, so
# an out/ path holding a space, a quote or a % would otherwise send host keys elsewhere.
ssh_to_vm() (
  cd "$1/$OUT_SSH" || exit 255
  port=$2 vm=$3
  shift 3
  exec ssh -i "./$SSH_KEY" -p "$port" -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR \
    -o UserKnownHostsFile="./$SSH_KNOWN_HOSTS" -o StrictHostKeyChecking=accept-new \
    -o HostKeyAlias="leanvm-$vm" -o HashKnownHosts=no -o ConnectTimeout=10 "${LEANVM_SSH_USER:-core}@127.0.0.1" "$@"
)

# --- the QEMU monitor: HMP through the FIFOs monitor.in/.out beside run.sh ---------------
# Send HMP command(s) $2 to the QEMU of the VM in directory $1 and print the first line of
# the reply that matches extended regex $3 (after what earlier commands left is read off),
# waiting up to $4 seconds; false if none came. Its reader of monitor.out never outlives it:
# killed on a signal, and, if a SIGKILL left one (monitor.reader names it), by the next call.
hmp() (
  reply=$1/$VM_MONITOR.reply
  stop_reader "$1"
  drain_fifo "$1/$VM_MONITOR.out"
  reader="" writer=""
  trap 'kill $reader $writer 2>/dev/null || true; rm -f "$reply" "$1/$VM_MONITOR.reader"' EXIT
  trap 'exit 1' INT TERM HUP
  : >"$reply"  # there before the reader starts: read below at once
  cat "$1/$VM_MONITOR.out" >>"$reply" 2>/dev/null &
  reader=$!
  echo "$reader" >"$1/$VM_MONITOR.reader"
  printf '%s\n' "$2" >"$1/$VM_MONITOR.in" 2>/dev/null &
  writer=$!
  tries=0 found=""
  while [ "$tries" -lt $(($4 * 50)) ]; do
    found=$(tr -d '\r' 2>/dev/null <"$reply" | grep -a -m 1 -E -- "$3") && break
    sleep 0.02
    tries=$((tries + 1))
  done
  [ -n "$found" ] && printf '%s\n' "$found"
)

# Kill the reader of monitor.out that an hmp killed with SIGKILL left (monitor.reader).
stop_reader() {
  stop_reader_pid=$(cat "$1/$VM_MONITOR.reader" 2>/dev/null) || return 0
  if alive "$stop_reader_pid" && tr '\0' ' ' <"/proc/$stop_reader_pid/cmdline" 2>/dev/null | grep -qF "$1/$VM_MONITOR.out"; then
    kill "$stop_reader_pid" 2>/dev/null || true
  fi
  rm -f "$1/$VM_MONITOR.reader"
}

# Read off what FIFO $1 holds (what earlier monitor commands left). GNU dd (Linux) reads what
# is there and stops; elsewhere cat reads for 50 ms.
drain_fifo() {
  if [ -r /proc/self/stat ]; then
    dd if="$1" of=/dev/null bs=65536 iflag=nonblock 2>/dev/null || true
  else
    timeout 0.05 cat "$1" >/dev/null 2>&1 || true
  fi
}

# $1 as one sh word ('...'), and as one HMP string ("...", \ and " escaped).
sh_word() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
hmp_string() { printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"; }

# --- a restore's disks: a snapshot's copied in beside a VM's (*.restoring), then swapped in;
# the VM's own stay as *.before-restore until the restore is kept (drop_old_disks) or not
# (put_old_disks_back). $1 is the VM's directory in out/vms. The root disk goes first in
# every step, so that its *.before-restore is the mark of a restore not yet kept: while it
# is there, the VM's own disks are the *.before-restore files (and the disks not yet
# swapped). No step overwrites a *.before-restore, and each is safe to repeat.
RESTORED_DISKS="$VM_ROOT_DISK $VM_OEM_DISK"

# Copy the disks of snapshot directory $2 (SNAP/NAME) beside VM directory $1's; false, and
# nothing copied left, if one could not be copied.
copy_snapshot_disks() {
  for disk in $RESTORED_DISKS; do
    cp --sparse=always --reflink=auto "$2/$disk" "$1/$disk.restoring" || { discard_snapshot_disks "$1"; return 1; }
  done
}
discard_snapshot_disks() { for disk in $RESTORED_DISKS; do rm -f "$1/$disk.restoring"; done; }
# False, with nothing swapped, unless every disk has its copy and no *.before-restore is
# there; false after a partial swap too (put_old_disks_back undoes it).
swap_in_snapshot_disks() {
  for disk in $RESTORED_DISKS; do
    [ -f "$1/$disk.restoring" ] && [ -f "$1/$disk" ] && [ ! -e "$1/$disk.before-restore" ] || return 1
  done
  for disk in $RESTORED_DISKS; do
    mv "$1/$disk" "$1/$disk.before-restore" && mv "$1/$disk.restoring" "$1/$disk" || return 1
  done
}
old_disks_kept() { [ -f "$1/$VM_ROOT_DISK.before-restore" ]; }
# The restore is kept: the VM's disks from before go, the root disk's first.
drop_old_disks() { for disk in $RESTORED_DISKS; do rm -f "$1/$disk.before-restore"; done; }
# The restore is not kept: each disk from before goes back where its *.before-restore is (a
# disk not yet swapped stays), and the snapshot's copies go. Once the restore was kept (the
# root disk's *.before-restore gone), only what dropping it left is removed.
put_old_disks_back() {
  if old_disks_kept "$1"; then
    for disk in $RESTORED_DISKS; do
      [ ! -f "$1/$disk.before-restore" ] || mv -f "$1/$disk.before-restore" "$1/$disk"
    done
  fi
  drop_old_disks "$1"
  discard_snapshot_disks "$1"
}

# A restore of the VM in directory $1 that ended before it was kept or undone (its command
# was killed): the VM's own disks back, in one line ($2 names the command, for it). Only
# while no run.sh holds the VM's run.lock (a running restore's files are its own).
recover_disks() (
  leftover=""
  for file in "$1"/*.restoring "$1"/*.before-restore; do [ ! -e "$file" ] || leftover=yes; done
  [ -n "$leftover" ] || exit 0
  exec 8>>"$1/$VM_RUN_LOCK"
  flock -n 8 || exit 0
  recover_disks_locked "$1" "$2"
)
# The same, by the holder of the VM's run.lock.
recover_disks_locked() {
  if ! old_disks_kept "$1"; then put_old_disks_back "$1"; return 0; fi  # only copies or remnants left
  put_old_disks_back "$1"
  echo "$2: VM ${1##*/}: its own disks were put back (a restore of it had been interrupted)" >&2
}

# --- snapshots: out/snapshots/SNAP/ (manifest, B3SUMS, NAME/{memory,rootfs.img,oem.img,values.env})
# The values of a VM that a snapshot is tied to: another value means another VM (or cluster).
SNAPSHOT_IDENTITY="ssh_port mac cluster_mac cluster_ip host_ports image_dir release version arch machine cpus memory user_netdev"

# Refuse, in one line, a snapshot name that is not a plain word: ^[a-z0-9][a-z0-9._-]{0,62}$
# (leanvm.ship.bundle.SNAPSHOT_NAME is the same rule; README, Snapshot and restore).
check_snapshot_name() {
  case $1 in
    [a-z0-9]*) ;;
    *) die "'$1' is not a snapshot name: use a plain word of lower-case letters, digits, . _ -, starting with a letter or digit, such as ready" ;;
  esac
  case $1 in
    *[!a-z0-9._-]*) die "'$1' is not a snapshot name: use a plain word of lower-case letters, digits, . _ -, starting with a letter or digit, such as ready" ;;
  esac
  [ "${#1}" -le 63 ] || die "'$1' is not a snapshot name: at most 63 characters"
}

# The value of key $2 in manifest $1 (read, never sourced: a snapshot may come from a bundle).
manifest_value() { awk -v key="$2" 'index($0, key "=") == 1 { print substr($0, length(key) + 2); exit }' "$1"; }

# The value of key $2 in values file $1, as the shell would read it (quotes removed).
values_value() (
  line=$(grep -m 1 "^$2=" "$1" 2>/dev/null) || exit 0
  value=${line#*=}
  case $value in \'*\') value=${value#\'}; value=${value%\'} ;; esac
  printf '%s\n' "$value"
)

# This host's CPU model (what -cpu host hands a KVM guest).
host_cpu_model() { sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1; }

# The accelerator to restore VM $2 of snapshot directory $1 under: the snapshot's, which
# LEANVM_ACCEL=auto takes; another LEANVM_ACCEL is refused.
snapshot_accel() {
  snapshot_accel_saved=$(manifest_value "$1/$SNAPSHOT_MANIFEST" "$2.accel")
  case ${LEANVM_ACCEL:-auto} in
    auto|"$snapshot_accel_saved") ;;
    *) die "snapshot ${1##*/}: VM $2 was saved under $snapshot_accel_saved, and LEANVM_ACCEL=$LEANVM_ACCEL;" \
      "a running VM's state moves only to the same accelerator: unset LEANVM_ACCEL, or boot it cold (cluster.sh up)" ;;
  esac
  echo "$snapshot_accel_saved"
}

# Refuse, in one line, to restore VM $2 (values file $3, QEMU binary $4) from snapshot
# directory $1 unless this host would run what was saved: the same VM (its identity values),
# QEMU version, machine, accelerator and CPU model, and every file of the VM as the
# snapshot's B3SUMS lists it.
check_snapshot() {
  [ -r "$1/$SNAPSHOT_MANIFEST" ] || die "no snapshot ${1##*/} in ${1%/*} (no manifest): see cluster.sh snapshot"
  case " $(manifest_value "$1/$SNAPSHOT_MANIFEST" vms) " in
    *" $2 "*) ;;
    *) die "snapshot ${1##*/} holds no VM $2 (it holds: $(manifest_value "$1/$SNAPSHOT_MANIFEST" vms))" ;;
  esac
  check_snapshot_files "$1" "$2"
  check_differs=$(identity_difference "$1/$2/$SNAPSHOT_VALUES" "$3")
  [ -z "$check_differs" ] || die "snapshot ${1##*/}: VM $2's $check_differs: the snapshot belongs to another" \
    "cluster, out/ or set-up of this VM; boot it cold (cluster.sh up $2)"
  check_was=$(manifest_value "$1/$SNAPSHOT_MANIFEST" "$2.qemu_version")
  check_now=$("$4" --version 2>/dev/null | head -n 1)
  [ "$check_was" = "$check_now" ] || die "snapshot ${1##*/} was saved by '$check_was', this host runs" \
    "'$check_now': QEMU loads only its own version's state; boot VM $2 cold (cluster.sh up $2)"
  check_accel=$(snapshot_accel "$1" "$2") || exit 1
  if [ "$check_accel" = kvm ] && [ "$(resolve_accel auto)" != kvm ]; then
    die "snapshot ${1##*/}: VM $2 was saved under KVM, which this host cannot run; boot it cold (cluster.sh up $2)"
  fi
  if [ "$(manifest_value "$1/$SNAPSHOT_MANIFEST" "$2.cpu")" = host ]; then
    check_was=$(manifest_value "$1/$SNAPSHOT_MANIFEST" "$2.cpu_model")
    [ "$check_was" = "$(host_cpu_model)" ] || die "snapshot ${1##*/}: VM $2 was saved under KVM with -cpu host on" \
      "'$check_was', this host's CPU is '$(host_cpu_model)'; boot it cold (cluster.sh up $2)"
  fi
  checked_stat "$1" "$2" | cmp -s - "$1/.checked-$2" && return 0
  command -v b3sum >/dev/null 2>&1 || die "b3sum not found: install it (apt-get install b3sum)"
  check_bad=$(cd "$1" && grep -e "^[0-9a-f]*  $2/" -e "^[0-9a-f]*  $SNAPSHOT_MANIFEST\$" "$SNAPSHOT_DIGESTS" | b3sum -c --quiet - 2>&1 |
    sed -n 's/: FAILED.*//p;s/: No such.*//p' | head -n 1) || true
  [ -z "$check_bad" ] || die "snapshot ${1##*/}: $1/$check_bad differs from its digest in B3SUMS: the snapshot is damaged; take a new one"
  checked_stat "$1" "$2" >"$1/.checked-$2" 2>/dev/null || true
}

# Refuse, in one line, a snapshot directory $1 whose B3SUMS is missing, or does not list
# each file of VM $2 a restore needs, or lists one that is missing.
check_snapshot_files() {
  [ -f "$1/$SNAPSHOT_DIGESTS" ] || die "snapshot ${1##*/} has no $SNAPSHOT_DIGESTS ($1/$SNAPSHOT_DIGESTS):" \
    "it is incomplete or damaged; take a new one"
  for check_file in $SNAPSHOT_MEMORY $RESTORED_DISKS $SNAPSHOT_VALUES; do
    awk -v file="$2/$check_file" 'substr($0, index($0, "  ") + 2) == file { found = 1 } END { exit !found }' \
        "$1/$SNAPSHOT_DIGESTS" ||
      die "snapshot ${1##*/}: $SNAPSHOT_DIGESTS lists no $2/$check_file: the snapshot is incomplete or damaged; take a new one"
    [ -f "$1/$2/$check_file" ] ||
      die "snapshot ${1##*/}: $1/$2/$check_file is missing: the snapshot is incomplete or damaged; take a new one"
  done
}

# The stat (size, mtime, ctime, inode) of VM $2's files and the manifest in snapshot
# directory $1: .checked-NAME holds it from the last time they matched B3SUMS (or were
# written), so that an unchanged snapshot is not read in full again; any change to a file
# (a copy, a restore from a cache, an edit) changes its ctime and it is checked in full.
checked_stat() { (cd "$1" && find "$SNAPSHOT_MANIFEST" "$SNAPSHOT_DIGESTS" "$2" -type f -exec stat -c '%s %Y %Z %i %n' {} + | sort -k 5); }

# The first identity value (SNAPSHOT_IDENTITY) in which values file $1 (a snapshot's) and
# $2 (the VM's now) differ, as "KEY was 'A', is now 'B'"; nothing if none does.
identity_difference() {
  awk -v keys=" $SNAPSHOT_IDENTITY " '
    { key = $0; sub(/=.*/, "", key); value = substr($0, length(key) + 2); gsub(/^\047|\047$/, "", value) }
    index(keys, " " key " ") && FNR == NR { was[key] = value; next }
    index(keys, " " key " ") { now[key] = value }
    END {
      n = split(keys, list, " ")
      for (i = 1; i <= n; i++) if (was[list[i]] != now[list[i]]) {
        printf "%s was \047%s\047, is now \047%s\047\n", list[i], was[list[i]], now[list[i]]; exit
      }
    }' "$1" "$2"
}
