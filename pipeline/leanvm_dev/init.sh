#!/bin/busybox sh
# shellcheck shell=sh
# /init of leanvm's mini release. It follows the contract of Flatcar's initrd:
# mount.usr= (a path, LABEL=, UUID= or PARTLABEL=, found as Flatcar's busybox stage 1 finds
# it), mount.usrfstype=, mount.usrflags=, root=, rootflags=, rootfstype=; it mounts the disk
# labelled OEM on /oem when Flatcar would; and with flatcar.first_boot= it runs the real Ignition (Debian's
# 2.14) on /sysroot with the config from fw_cfg, as Flatcar's initrd does on a first boot.
# A /usr given as a file in the initramfs is loop-mounted (PXE style).
# It reports what it did on the serial console, logs the boot on the root disk, powers off.
# `leanvm.shell` on the kernel command line keeps a shell instead of powering off,
# `leanvm.hold` keeps the VM up until QEMU is stopped, `leanvm.ping=IP,...` pings peers on
# the cluster network (configured from the systemd-networkd unit in user_data) for up to
# 90 s each, `leanvm.unreachable=IP,...` checks for 10 s each that they do not answer,
# `leanvm.fillcache` reads all of /usr into the page cache, waits 20 s (for the host to
# measure) and drops it again; `leanvm.dropcaches` drops the page cache (benchmarks). Both
# then print the guest's memory (meminfo: ... kB).
# `reboot` and `poweroff` inside the guest work as on any Linux (see the traps below).
PATH=/bin
export PATH
/bin/busybox mkdir -p /proc /sys /dev /sysroot /mnt/config
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

say() { echo "leanvm: $*"; }

usr="" usrfstype="" usrflags="ro" root="" rootflags="rw" rootfstype="" shell="" hold="" ping="" first_boot=""
unreachable="" fillcache="" dropcaches="" emergency_timeout=300 ignition_failed=""
# shellcheck disable=SC2013  # the command line is split into words on purpose
for word in $(cat /proc/cmdline); do
  case $word in
    mount.usr=*) usr=${word#*=} ;;
    mount.usrfstype=*) usrfstype=${word#*=} ;;
    mount.usrflags=*) usrflags=${word#*=} ;;
    root=*) root=${word#*=} ;;
    rootflags=*) rootflags=${word#*=} ;;
    rootfstype=*) rootfstype=${word#*=} ;;
    leanvm.shell) shell=1 ;;
    leanvm.hold) hold=1 ;;
    leanvm.ping=*) ping=${word#*=} ;;
    leanvm.unreachable=*) unreachable=${word#*=} ;;
    leanvm.fillcache) fillcache=1 ;;
    leanvm.dropcaches) dropcaches=1 ;;
    leanvm.emergency_timeout=*) emergency_timeout=${word#*=} ;;
    flatcar.first_boot=*|coreos.first_boot=*) first_boot=${word#*=} ;;
  esac
done

finish() {
  if [ -n "$shell" ]; then
    say "shell requested (leanvm.shell); exit it to power off"
    setsid cttyhack sh
  elif [ -n "$hold" ]; then
    wait_for_power_button
  fi
  shut_down poweroff
}

# Unmount and power off or reboot ($1): the kernel then says "reboot: Power down" or
# "reboot: Restarting system".
shut_down() {
  [ -z "${power_listener-}" ] || kill "$power_listener" 2>/dev/null
  [ -f /sysroot/run/dropbear.pid ] && kill "$(cat /sysroot/run/dropbear.pid)" 2>/dev/null
  umount /sysroot/dev/pts /sysroot/dev /sysroot/proc /sysroot/sys 2>/dev/null
  umount /mnt/config /sysroot/oem /sysroot/usr /sysroot 2>/dev/null
  sync
  if [ "$1" = reboot ]; then say "rebooting"; reboot -f; else say "powering off"; poweroff -f; fi
}

# Block until the power button is pressed (QEMU's system_powerdown), or forever when there
# is none: ACPI's "Power Button" on amd64 (there can be more than one: watch them all), the
# device tree's GPIO power key ("gpio-keys") on arm64's virt machine.
wait_for_power_button() {
  buttons=""
  for input in /sys/class/input/event*; do
    case $(cat "$input/device/name" 2>/dev/null) in
      "Power Button"|gpio-keys) buttons="$buttons /dev/input/${input##*/}" ;;
    esac
  done
  if [ -z "$buttons" ]; then
    say "holding (leanvm.hold) until QEMU is stopped: no power button"
    while :; do sleep 1; done
  fi
  pressed=""
  trap 'pressed=1' USR1
  for button in $buttons; do
    (dd if="$button" bs=24 count=1 >/dev/null 2>&1 && kill -USR1 $$) &
  done
  sleep 1  # let the watchers open their devices before saying we are ready for a press
  say "holding (leanvm.hold) until powered off (power button:$buttons)"
  while [ -z "$pressed" ]; do sleep 1; done
  say "power button pressed"
}

# A failed boot fails as Flatcar's initrd does: the emergency target, whose hook (bootengine
# dracut/99emergency-timeout/timeout.sh, flatcar-master 6c2fba41) says that Ignition failed
# when it did, then offers a shell for 300 s and reboots: with nobody at the console, a
# reboot loop. The lines are the hook's; leanvm.emergency_timeout=SECONDS shortens the wait.
fail() {
  say "FAILED: $*"
  if [ -n "$ignition_failed" ]; then
    echo "Ignition has failed. Please ensure your config is valid."
    tail -n 20 /run/ignition.log 2>/dev/null
  fi
  minutes=$((emergency_timeout / 60)) seconds=$((emergency_timeout % 60)) label=minutes
  [ "$minutes" != 1 ] || label=minute
  if [ "$seconds" != 0 ]; then wait_for="$minutes $label $seconds seconds"; else wait_for="$minutes $label"; fi
  echo "Press Enter for emergency shell or wait $wait_for for reboot."
  sleep "$emergency_timeout"
  echo "Rebooting."
  shut_down reboot
}

# `reboot` and `poweroff` in the guest (busybox's) signal pid 1, as they do to any init:
# SIGTERM reboots, SIGUSR2 powers off. (The shell runs a trap once its current command ends:
# every wait here is at most a second long.)
trap 'say "reboot requested"; shut_down reboot' TERM
trap 'say "power-off requested"; shut_down poweroff' USR2

while read -r module; do
  insmod "/lib/modules/$module" 2>/dev/null || say "warning: insmod $module failed"
done </lib/modules/load.order

# A device named the way Flatcar's stage 1 names it. There is no udev: a PARTLABEL= is the
# partition whose uevent has PARTNAME=LABEL; LABEL= and UUID= are found by findfs.
resolve() {
  case $1 in
    PARTLABEL=*)
      for uevent in /sys/class/block/*/uevent; do
        if grep -qx "PARTNAME=${1#PARTLABEL=}" "$uevent"; then
          echo "/dev/$(sed -n 's/^DEVNAME=//p' "$uevent")"
          return 0
        fi
      done
      return 1 ;;
    LABEL=*|UUID=*) findfs "$1" 2>/dev/null ;;
    *) [ -b "$1" ] || [ -f "$1" ] && echo "$1" ;;  # a file: PXE-style, /usr held in RAM
  esac
}

wait_for() {
  tries=0
  while [ "$tries" -lt 100 ]; do
    resolve "$1" && return 0
    sleep 0.1
    tries=$((tries + 1))
  done
  return 1
}

mount_fs() { # DEVICE MOUNTPOINT FSTYPE FLAGS
  if [ -n "$3" ]; then mount -t "$3" -o "$4" "$1" "$2"; else mount -o "$4" "$1" "$2"; fi
}

[ -n "$root" ] || fail "no root= on the kernel command line"
rootdev=$(wait_for "$root") || fail "root device $root not found"
mount_fs "$rootdev" /sysroot "$rootfstype" "$rootflags" || fail "cannot mount $rootdev on /"
say "root mounted: $(grep ' /sysroot ' /proc/mounts)"

if [ -n "$usr" ]; then
  usrdev=$(wait_for "$usr") || fail "usr device $usr not found"
  mkdir -p /sysroot/usr
  [ -f "$usrdev" ] && usrflags="$usrflags,loop"
  mount_fs "$usrdev" /sysroot/usr "$usrfstype" "$usrflags" || fail "cannot mount $usrdev on /usr"
  say "usr mounted: $(grep ' /sysroot/usr ' /proc/mounts)"
fi
# The OEM disk, mounted when Flatcar would: on a first boot by the initrd, for Ignition's
# files stage (bootengine dracut/30ignition/ignition-files.service); on a later boot only
# by the real root's oem.mount, whose ConditionPathExists=!/usr/.noupdate skips it with a
# PXE /usr (flatcar/init systemd/system/oem.mount) unless a drop-in resets that condition
# (an empty ConditionPathExists= line, as leanvm's configs write).
mkdir -p /sysroot/oem /sysroot/etc
oem_wanted() {
  [ -n "$first_boot" ] && [ "$first_boot" != 0 ] && return 0
  [ -e /sysroot/usr/.noupdate ] || return 0
  grep -qx 'ConditionPathExists=' /sysroot/etc/systemd/system/oem.mount.d/*.conf 2>/dev/null
}
if ! oem_wanted; then
  say "oem: not mounted (/usr/.noupdate, and no oem.mount drop-in resets ConditionPathExists)"
elif oemdev=$(wait_for LABEL=OEM) && mount -t ext4 -o nodev "$oemdev" /sysroot/oem; then
  say "oem mounted: $(grep ' /sysroot/oem ' /proc/mounts)"
else
  say "warning: no OEM disk (LABEL=OEM)"
fi
if touch /sysroot/usr/.leanvm-write-test 2>/dev/null; then say "usr writable: yes"; else say "usr writable: no"; fi
say "release: $(chroot /sysroot /usr/bin/busybox cat /usr/lib/os-release | grep '^PRETTY_NAME=')"

# The config drive, found as Flatcar's 90-configdrive.rules finds it (flatcar/coreos-cloudinit
# units/): a block device labelled config-2 (iso9660, udf or vfat), mounted read-only. No 9p
# share: Flatcar would apply a 9p config-2 on every boot, and QEMU cannot save a VM that has
# one mounted. Its cloud-config is applied after Ignition, as coreos-cloudinit runs then.
if drive=$(wait_for LABEL=config-2) && mkdir -p /mnt/config && mount -o ro "$drive" /mnt/config; then
  say "config drive mounted: $(head -n 1 /mnt/config/openstack/latest/user_data 2>/dev/null)"
else
  say "warning: no config-2 drive"
fi

ip link set lo up

# A blank root is set up the way Flatcar's initrd-setup-root does it from /usr: the
# merged-/usr links, /etc with the users root and core.
for dir in bin sbin lib lib64; do
  [ -e "/sysroot/$dir" ] || ln -s "usr/$dir" "/sysroot/$dir"
done
mkdir -p /sysroot/etc /sysroot/run /sysroot/tmp /sysroot/root /sysroot/home/core /sysroot/etc/dropbear
[ -s /sysroot/etc/passwd ] ||
  printf 'root:x:0:0:root:/root:/bin/sh\ncore:x:500:500:Flatcar user:/home/core:/bin/sh\n' >/sysroot/etc/passwd
[ -s /sysroot/etc/shadow ] || printf 'root:*:1::::::\ncore:*:1::::::\n' >/sysroot/etc/shadow
# the groups of Flatcar's baselayout that users are commonly put in
[ -s /sysroot/etc/group ] ||
  printf 'root:x:0:\nwheel:x:10:root,core\nsudo:x:150:core\ndocker:x:233:core\ncore:x:500:\n' >/sysroot/etc/group
[ -s /sysroot/etc/gshadow ] || sed 's/^\([^:]*\):x:[0-9]*:\(.*\)/\1:!::\2/' /sysroot/etc/group >/sysroot/etc/gshadow
chmod 600 /sysroot/etc/shadow /sysroot/etc/gshadow
chown 500:500 /sysroot/home/core
[ -s /sysroot/etc/shells ] || echo /bin/sh >/sysroot/etc/shells

# NIC 1 is QEMU's user network (MAC 52:54:00:...): its fixed address, as its DHCP would give.
for dev in /sys/class/net/*; do
  case $(cat "$dev/address" 2>/dev/null) in
    52:54:00:*)
      ip addr add 10.0.2.15/24 dev "${dev##*/}" && ip link set "${dev##*/}" up &&
        ip route add default via 10.0.2.2 && say "user network: ${dev##*/} 10.0.2.15/24" ;;
  esac
done
echo "0 2147483647" >/proc/sys/net/ipv4/ping_group_range  # ping for every user, as systemd sets it

# Ignition: only on a first boot (flatcar.first_boot=), as Flatcar's ignition-generator
# decides. The real Ignition runs its stages against /sysroot, with the config from QEMU's
# fw_cfg (Flatcar's name; `-platform file`, since upstream's qemu platform reads only
# opt/com.coreos/config); it writes /etc/.ignition-result.json itself. A failed stage fails
# the boot, as Flatcar's emergency target does.
run_ignition() {
  config=/run/ignition-no-config  # empty: Ignition goes on without a user config, as on Flatcar
  : >"$config"
  for key in opt/org.flatcar-linux/config opt/com.coreos/config; do
    raw=/sys/firmware/qemu_fw_cfg/by_name/$key/raw
    if [ -r "$raw" ]; then
      config=$raw
      say "ignition: $key version $(tr -d ' \n' <"$raw" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')"
      break
    fi
  done
  [ "$config" != /run/ignition-no-config ] || say "ignition: no config in fw_cfg"
  selinux_stub=""
  if [ ! -e /sysroot/etc/selinux/config ]; then  # Debian's Ignition relabels: give it "none"
    mkdir -p /sysroot/etc/selinux && echo SELINUXTYPE=none >/sysroot/etc/selinux/config && selinux_stub=1
  fi
  for stage in fetch-offline disks mount files umount; do
    if ! IGNITION_CONFIG_FILE=$config PATH=/usr/sbin:/usr/bin:/bin \
        ignition --root=/sysroot --platform=file --stage="$stage" --log-to-stdout >>/run/ignition.log 2>&1; then
      tail -n 5 /run/ignition.log
      ignition_failed=1
      fail "ignition: stage $stage failed: $(grep CRITICAL /run/ignition.log | tail -n 1)"
    fi
  done
  [ -z "$selinux_stub" ] || rm -rf /sysroot/etc/selinux
  sync
  [ -f /sysroot/etc/.ignition-result.json ] && say "ignition: result written"
}
if [ -n "$first_boot" ] && [ "$first_boot" != 0 ]; then
  say "first boot: yes (flatcar.first_boot=$first_boot)"
  PATH=/usr/bin:/bin run_ignition
else
  say "first boot: no"
fi

# The hostname: /etc/hostname (which Ignition may have written), as systemd sets it at boot;
# then the config drive's cloud-config (coreos-cloudinit), unless Ignition had a user config:
# user-configdrive.service skips the drive then (ExecCondition on userConfigProvided in
# /etc/.ignition-result.json, flatcar/coreos-cloudinit units/user-configdrive.service).
[ -s /sysroot/etc/hostname ] && hostname "$(head -n 1 /sysroot/etc/hostname)"
user_data=""
if [ -r /mnt/config/openstack/latest/user_data ]; then
  if grep -q '"userConfigProvided": *true' /sysroot/etc/.ignition-result.json 2>/dev/null; then
    say "config drive: skipped (Ignition had a user config: userConfigProvided)"
  else
    user_data=/mnt/config/openstack/latest/user_data
    name=$(sed -n 's/^hostname:[[:space:]]*//p' "$user_data" 2>/dev/null | head -n 1 | tr -d "\"' ")
    [ -n "$name" ] && hostname "$name"
  fi
fi
say "hostname: $(hostname)"

# systemd-networkd, as Flatcar runs it: it starts after Ignition (which may have written
# units) and before the config drive is read, and applies the units in
# /etc/systemd/network; coreos-cloudinit restarts it only for network units under
# coreos.units (initialize/config.go, processUnits). Nothing else configures a NIC: where
# Flatcar would get no address, neither does the mini release. Each unit: [Match]
# MACAddress= and [Network] Address=.
networkd() {
  for unit in /sysroot/etc/systemd/network/*.network; do
    [ -f "$unit" ] || continue
    mac=$(sed -n 's/^[[:space:]]*MACAddress=//p' "$unit" | head -n 1)
    address=$(sed -n 's/^[[:space:]]*Address=//p' "$unit" | head -n 1)
    if [ -z "$mac" ] || [ -z "$address" ]; then continue; fi
    ifname=$(nic_with_mac "$mac")
    if [ -z "$ifname" ]; then
      say "warning: no NIC with MAC $mac for ${unit##*/}"
    elif ip addr show dev "$ifname" | grep -q "inet $address "; then
      :  # already applied before this restart
    elif ip addr add "$address" dev "$ifname" && ip link set "$ifname" up; then
      say "cluster network: $ifname $address (${unit##*/})"
    fi
  done
}

nic_with_mac() {
  tries=0
  while [ "$tries" -lt 50 ]; do
    for dev in /sys/class/net/*; do
      [ "$(cat "$dev/address" 2>/dev/null)" = "$1" ] && echo "${dev##*/}" && return 0
    done
    sleep 0.1
    tries=$((tries + 1))
  done
}

# The network units (.network, .netdev, .link) under coreos.units of #cloud-config $1, in
# the layout leanvm writes (PyYAML, `content: |` literal blocks), written to
# /etc/systemd/network; true if there was one (networkd restarts then). write_files never
# touch the network.
cloudinit_network_units() {
  awk '
    /^coreos:/ { in_coreos = 1; next }
    /^[^ #]/ { in_coreos = 0; in_units = 0 }
    in_coreos && /^  units:/ { in_units = 1; next }
    in_coreos && /^  [^ -]/ { in_units = 0 }
    !in_units { next }
    /^  - / || /^    [a-z_]+:/ {
      line = $0; sub(/^  - /, "    ", line)
      if (line ~ /^    name:/) { name = line; sub(/^    name:[ \t]*/, "", name); gsub(/["\047]/, "", name) }
      if (line ~ /^    content: *\|/) { block = 1; next }
      block = 0; next
    }
    block && /^      / { text = $0; sub(/^      /, "", text); print name "\t" text; next }
    block && /^[ \t]*$/ { print name "\t"; next }
  ' "$1" | while IFS="$(printf '\t')" read -r unit line; do
    case $unit in *.network|*.netdev|*.link) printf '%s\n' "$line" >>"/sysroot/etc/systemd/network/$unit.new" ;; esac
  done
  found=""
  for new in /sysroot/etc/systemd/network/*.new; do
    [ -f "$new" ] || continue
    mv "$new" "${new%.new}" && found=1
  done
  [ -n "$found" ]
}

# cloud-config's write_files, as coreos-cloudinit writes them (before it handles units):
# path, permissions (octal, default 0644) and content (a `|` block or one plain line), in
# the layout leanvm writes (PyYAML). A network unit among them is not applied on this boot.
cloudinit_write_files() {
  awk '
    /^write_files:/ { on = 1; next }
    /^[^ #-]/ { on = 0 }
    !on { next }
    /^- / || /^  [a-z_]+:/ {
      line = $0
      if (sub(/^- /, "  ", line)) print "item\t"
      key = line; sub(/^  /, "", key); value = key; sub(/:.*/, "", key)
      sub(/^[a-z_]+:[ \t]*/, "", value); gsub(/["\047]/, "", value)
      block = key == "content" && value ~ /^\|/
      if (!block) print key "\t" value
      next
    }
    block && /^    / { text = $0; sub(/^    /, "", text); print "line\t" text; next }
    block && /^[ \t]*$/ { print "line\t"; next }
  ' "$1" | {
    path="" mode=0644
    : >/run/write-file
    place() {
      [ -n "$path" ] || return 0
      mkdir -p "/sysroot${path%/*}" && cp /run/write-file "/sysroot$path.leanvm-new" &&
        chmod "$mode" "/sysroot$path.leanvm-new" && mv -f "/sysroot$path.leanvm-new" "/sysroot$path" &&
        say "cloud-config: wrote $path"
      path="" mode=0644
      : >/run/write-file
    }
    while IFS="$(printf '\t')" read -r key value; do
      case $key in
        item) place ;;
        path) path=$value ;;
        permissions) case $value in 0*) mode=$value ;; *) mode=$(printf '%o' "$value") ;; esac ;;
        content) printf '%s\n' "$value" >/run/write-file ;;
        line) printf '%s\n' "$value" >>/run/write-file ;;
      esac
    done
    place
  }
}

mkdir -p /sysroot/etc/systemd/network
networkd
if [ -n "${user_data:-}" ] && [ -r "$user_data" ]; then cloudinit_write_files "$user_data"; fi
if [ -n "${user_data:-}" ] && [ -r "$user_data" ] && cloudinit_network_units "$user_data"; then
  say "cloud-config: network units under coreos.units: restarting networkd"
  networkd
fi
# True once $1 answers a ping, trying for $2 seconds.
answers() {
  tries=0
  until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -ge "$2" ] && return 1
    sleep 1
  done
}
for peer in $(echo "$ping" | tr ',' ' '); do
  if answers "$peer" 90; then say "ping $peer: ok"; else say "ping $peer: failed"; fi
done
for peer in $(echo "$unreachable" | tr ',' ' '); do
  if answers "$peer" 10; then say "unreachable $peer: no, it answers"; else say "unreachable $peer: yes"; fi
done


# core's authorized keys: the config drive's on every boot (coreos-cloudinit), Ignition's
# from the first boot (kept), merged as Flatcar's update-ssh-keys does.
keys=/sysroot/home/core/.ssh/authorized_keys.d
mkdir -p "$keys"
sed -n '/^ssh_authorized_keys:/,/^[^ -]/s/^ *- *//p' "${user_data:-/dev/null}" 2>/dev/null | tr -d "\"'" \
  >"$keys/coreos-cloudinit"
cat "$keys"/* >/sysroot/home/core/.ssh/authorized_keys 2>/dev/null
chmod 700 /sysroot/home/core/.ssh && chmod 600 /sysroot/home/core/.ssh/authorized_keys
chown -R 500:500 /sysroot/home/core
say "ssh keys for core: $(grep -c . /sysroot/home/core/.ssh/authorized_keys)"
# Other users' keys from Ignition (root's, say), merged the same way.
for keys in /sysroot/root/.ssh/authorized_keys.d /sysroot/home/*/.ssh/authorized_keys.d; do
  if [ -d "$keys" ] && [ "$keys" != /sysroot/home/core/.ssh/authorized_keys.d ]; then
    cat "$keys"/* >"${keys%.d}" 2>/dev/null && chmod 600 "${keys%.d}"
  fi
done

# sshd for a VM that stays up: Debian's dropbear from /usr, host keys made on the first
# start and kept on the root disk (/etc/dropbear).
start_sshd() {
  mkdir -p /sysroot/dev /sysroot/proc /sysroot/sys
  mount --bind /dev /sysroot/dev && mkdir -p /sysroot/dev/pts && mount -t devpts devpts /sysroot/dev/pts
  mount -t proc proc /sysroot/proc
  mount -t sysfs sysfs /sysroot/sys  # as on Flatcar: the drivers (virtio_balloon, ...) are visible
  if chroot /sysroot /usr/sbin/dropbear -R -p 22 -P /run/dropbear.pid; then
    say "sshd: listening on port 22"
  else
    say "warning: sshd did not start"
  fi
  listen_for_power_requests
}

# `sudo systemctl poweroff|reboot` and `sudo date -u -s @SECONDS` from a user of the guest
# (the stand-ins in /usr/bin): a request written to this FIFO, read here as root, powers off
# or reboots as the signals do, or sets the clock.
listen_for_power_requests() {
  rm -f /sysroot/run/leanvm-power && mkfifo -m 622 /sysroot/run/leanvm-power || return 0
  (
    while :; do
      read -r what </sysroot/run/leanvm-power || continue
      case $what in
        poweroff) kill -USR2 1 ;;
        reboot) kill -TERM 1 ;;
        clock\ [0-9]*) case ${what#clock } in *[!0-9]*) ;; *) date -u -s "@${what#clock }" >/dev/null ;; esac ;;
      esac
    done
  ) &
  power_listener=$!
}
if [ -n "$hold" ] || [ -n "$shell" ]; then start_sshd; fi

mkdir -p /sysroot/var/log
if echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) booted" >>/sysroot/var/log/leanvm-boots.log; then
  say "root writable: yes"
fi
say "boots logged: $(wc -l </sysroot/var/log/leanvm-boots.log)"
if [ -n "$fillcache" ]; then
  find /sysroot/usr -type f -exec cat {} + >/dev/null 2>&1
  say "cache filled: $(sed -n 's/^Cached: *//p' /proc/meminfo)"
  sleep 20
fi
if [ -n "$fillcache" ] || [ -n "$dropcaches" ]; then
  sync
  echo 3 >/proc/sys/vm/drop_caches
  say "cache dropped: $(sed -n 's/^Cached: *//p' /proc/meminfo)"
  say "meminfo:$(awk '/^(MemTotal|MemFree|Buffers|Cached|Shmem):/ { printf " %s %s", $1, $2 }' /proc/meminfo) kB"
fi
say "ready"
finish
