# Shared by the systemd guest's scenarios (run by /root/payload/run as root, with `sh -e`).
say() { echo "@@ $*"; }
fail() { say "ERROR $*"; exit 1; }
unit() { systemctl show -p "$1" --value nbdserver; }
journal() { journalctl -q -u nbdserver --output=cat "$@"; }
# wait_active: until the service is active (it may be starting still: a first start compiles its
# Python), at most 60 s.
wait_active() {
    tries=0
    while [ "$(unit ActiveState)" != active ]; do
        tries=$((tries + 1))
        [ $tries -lt 600 ] && [ "$(unit ActiveState)" != failed ] || return 1
        sleep 0.1
    done
}
# packages: the Debian packages of the payload, oldest version first.
packages() {
    for deb in files/nbdserver_*.deb; do echo "$(dpkg-deb -f "$deb" Version) $deb"; done | sort -V | cut -d' ' -f2
}
# block MARKER FILE: the lines of the first ```sh block after "<!-- MARKER" in FILE (the README's or
# the docs' commands, which the scenarios run as they stand there).
block() {
    awk -v marker="<!-- $1" 'index($0, marker) == 1 { found = 1; next }
        found && /^```sh/ { inside = 1; next }
        inside && /^```/ { exit }
        inside { print }' "$2"
}
# logged TEXT: until the service's journal holds TEXT, at most 10 s (a reload is signalled, and
# `systemctl reload` may return before the server has logged what it applied).
logged() {
    tries=0
    until journal | grep -q "$1"; do
        tries=$((tries + 1)); [ $tries -lt 100 ] || return 1; sleep 0.1
    done
}
metrics() { python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:10810/metrics").read().decode())'; }

# writing_ext4 [nbd-client options]: /dev/nbd0 attached to the export "disk" (4 KiB blocks, the
# options given), ext4 made on it and mounted on /mnt/disk, and the writer of fsynced files
# (_writer.sh) started in /mnt/disk/data.
writing_ext4() {
    modprobe nbd
    dmesg -c >/dev/null
    nbd-client 127.0.0.1 10809 /dev/nbd0 -b 4096 -N disk "$@" >/tmp/nbd-client.log 2>&1 || { cat /tmp/nbd-client.log; fail "nbd-client"; }
    tries=0
    until [ "$(cat /sys/block/nbd0/size)" -gt 0 ]; do
        tries=$((tries + 1)); [ $tries -lt 100 ] || fail "/dev/nbd0 has no size"; sleep 0.1
    done
    mkfs.ext4 -q -F /dev/nbd0
    mkdir -p /mnt/disk
    mount -t ext4 /dev/nbd0 /mnt/disk
    mkdir /mnt/disk/data
    start_writer /mnt/disk/data
}

# written_intact: stop the writer; e2fsck -fn clean, every fsynced file intact, the device
# detached, and nothing in the kernel's log.
written_intact() {
    stop_writer
    umount /mnt/disk
    e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck found problems"; }
    mount -t ext4 /dev/nbd0 /mnt/disk
    verify_synced /mnt/disk/data
    umount /mnt/disk
    nbd-client -d /dev/nbd0 >/dev/null
    kernel_clean
}
