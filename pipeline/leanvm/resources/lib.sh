# shellcheck shell=sh
# leanvm's shared shell functions: copied to out/lib.sh by `doit` and sourced by run.sh,
# cluster.sh and libvirt.sh. The sourcing script defines die() first.

# True if process $1 runs: a zombie (killed, not yet reaped by init) does not count.
alive() {
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "${state%% *}" != Z ]
}

# The accelerator for LEANVM_ACCEL ($1: auto, kvm or tcg): auto is KVM when /dev/kvm is
# usable by this user, else TCG. Prints kvm or tcg; fails for any other value.
resolve_accel() {
  case $1 in
    auto) if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo kvm; else echo tcg; fi ;;
    kvm|tcg) echo "$1" ;;
    *) return 1 ;;
  esac
}

# True if something on this host listens on TCP port $1 (any address).
port_in_use() {
  hex=$(printf ':%04X' "$1")
  awk -v port="$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Stop the cluster network's switch in directory $1 (out/net) and clear what it left; the
# caller holds $1/lock.
stop_switch() {
  pid=$(cat "$1/switch.pid" 2>/dev/null || true)
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    tries=0
    while alive "$pid" && [ "$tries" -lt 100 ]; do sleep 0.05; tries=$((tries + 1)); done
  fi
  rm -rf "$1/switch" "$1/switch.pid"
}

# First boot: Ignition runs only while root disk $1 has no /etc/.ignition-result.json, read
# host side with debugfs (read-only). False if the profile has no first-boot arguments ($2).
first_boot() {
  [ -n "$2" ] || return 1
  command -v debugfs >/dev/null 2>&1 || die "debugfs not found: install it (apt-get install e2fsprogs)"
  found=$(DEBUGFS_PAGER=__none__ debugfs -R 'stat /etc/.ignition-result.json' "$1" 2>&1) ||
    die "cannot read $1: $found"
  case $found in
    *Inode:*) return 1 ;;
    *"File not found"*) return 0 ;;
    *) die "cannot read $1 with debugfs: $(printf '%s' "$found" | tail -n 1)" ;;
  esac
}
