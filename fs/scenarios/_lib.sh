# Shared by the scenarios, which run in the guest (busybox sh, as root) with `sh -e`.
SERVER=10.0.2.100
PORT=10809
DEV=/dev/nbd0
MNT=/mnt

say() { echo "@@ $*"; }
# Ask the host for something (see fs/guest/guest.py) and wait until it is done.
host() { say "HOST $*"; read -r _done; }

# attach [nbd-client options]: connect /dev/nbd0 to the server's default export.
attach() {
    nbd-client "$SERVER" "$PORT" "$DEV" "$@" >/tmp/nbd-client.log 2>&1 || { cat /tmp/nbd-client.log; return 1; }
    # In ioctl mode (-nonetlink) the size appears once the client's background process starts.
    waited=0
    until [ "$(cat /sys/block/nbd0/size)" -gt 0 ]; do
        waited=$((waited + 1))
        [ $waited -lt 50 ] || { say "ERROR $DEV has no size"; return 1; }
        sleep 0.1
    done
}

detach() { nbd-client -d "$DEV" >/dev/null 2>&1 || true; }

# make_tree DIR: files of mixed sizes, from a few bytes to 300 KiB, two levels deep.
make_tree() {
    i=0
    while [ $i -lt 48 ]; do
        dir="$1/d$((i % 6))/e$((i % 4))"
        mkdir -p "$dir"
        size=$(( (i * 7919) % 300 * 1024 + i * 13 + 1 ))
        dd if=/dev/urandom of="$dir/f$i" bs="$size" count=1 2>/dev/null
        i=$((i + 1))
    done
}

# checksums DIR: one line per file, sorted, paths relative to DIR.
checksums() { (cd "$1" && find . -type f | sort | xargs sha256sum); }

# fsck_clean: e2fsck -fn must find nothing to fix.
fsck_clean() {
    e2fsck -fn "$DEV" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; say "ERROR e2fsck found problems"; return 1; }
}

# exercise [nbd-client options]: mkfs, a tree and a large direct-I/O file, sync, fsck, remount, verify.
exercise() {
    attach "$@"
    mkfs.ext4 -q -F "$DEV"
    mount -t ext4 "$DEV" "$MNT"
    make_tree "$MNT/tree"
    started=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/urandom of=/tmp/big bs=1M count=16 2>/dev/null
    dd if=/tmp/big of="$MNT/big" bs=1M oflag=direct 2>/dev/null
    ended=$(cut -d' ' -f1 /proc/uptime)
    say "DIRECT-WRITE 16 MiB in $(awk "BEGIN { print $ended - $started }") s"
    sync
    checksums "$MNT" >/tmp/sums
    umount "$MNT"
    fsck_clean
    mount -t ext4 "$DEV" "$MNT"
    checksums "$MNT" >/tmp/sums-again
    cmp /tmp/sums /tmp/sums-again || { say "ERROR checksums differ after remount"; return 1; }
    [ "$(wc -l < /tmp/sums)" -eq 49 ] || { say "ERROR expected 49 files"; return 1; }
    umount "$MNT"
    detach
}

# nbd_clean: since `dmesg -c`, the nbd driver logged no error (its every complaint about a request,
# a reply or a connection is one, level 3 or less), whatever its words; at detach it warns (level 4)
# that it is "shutting down sockets", which is no error.
nbd_clean() {
    if dmesg -r | grep -E '^<[0-3]>.*block nbd' >/tmp/nbd-kernel; then
        cat /tmp/nbd-kernel
        say "ERROR the nbd driver complained"
        return 1
    fi
}

# under_writes REQUEST TIMES [nbd-client options]: ext4 on the export written with fsync by the
# writer of _writer.sh (which the scenario sources) while the host is asked TIMES times, at random
# moments, for REQUEST (see fs/guest/guest.py); then no write failed, e2fsck -fn is clean, every
# fsynced file is intact once read back from the server, and the kernel logged no I/O error, ext4
# error, aborted journal or NBD complaint. No timeout is set unless the options set one (-t): a
# request the server dropped would hang, not pass. The fsynced files' checksums stay in /tmp/synced.
under_writes() {
    request=$1 times=$2
    shift 2
    dmesg -c >/dev/null  # what an earlier scenario made the kernel say is not this one's
    attach -b 4096 "$@"
    mkfs.ext4 -q -F "$DEV"
    mount -t ext4 "$DEV" "$MNT"
    mkdir "$MNT/data"
    start_writer "$MNT/data"
    n=0
    while [ $n -lt "$times" ]; do
        random_pause
        host "$request"
        n=$((n + 1))
    done
    stop_writer
    sync
    umount "$MNT"
    fsck_clean
    mount -t ext4 "$DEV" "$MNT"  # the files are read back from the server, not from the page cache
    verify_synced "$MNT/data"
    umount "$MNT"
    detach
    kernel_clean
    nbd_clean
}
