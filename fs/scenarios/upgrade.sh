# The server upgraded in place (SIGUSR2) ten times at random moments while ext4 on it is written
# with fsync, through one connection and then through four (nbd-client -C 4): no write fails, the
# kernel logs no I/O error, no ext4 error and no aborted journal, every fsynced file is intact, and
# e2fsck -fn is clean. No timeout is set: a request the server dropped would hang, not pass.
. /scenarios/_lib.sh

upgrade_under_writes() {
    dmesg -c >/dev/null  # what an earlier scenario made the kernel say is not this one's
    attach -b 4096 "$@"
    mkfs.ext4 -q -F "$DEV"
    mount -t ext4 "$DEV" "$MNT"
    mkdir "$MNT/data"
    : >/tmp/synced
    : >/tmp/failed
    rm -f /tmp/stop
    (
        i=0
        while [ ! -e /tmp/stop ]; do
            if dd if=/dev/urandom of="$MNT/data/f$i" bs=16k count=$((i % 8 + 1)) conv=fsync 2>/dev/null; then
                (cd "$MNT/data" && sha256sum "f$i") >>/tmp/synced
            else
                echo "f$i" >>/tmp/failed
            fi
            i=$((i + 1))
        done
    ) &
    writer=$!
    n=0
    while [ $n -lt 10 ]; do
        sleep "0.$(($(od -An -N1 -tu1 /dev/urandom) % 10))"
        host upgrade
        n=$((n + 1))
    done
    touch /tmp/stop
    wait $writer
    [ ! -s /tmp/failed ] || { say "ERROR writes failed: $(cat /tmp/failed)"; return 1; }
    umount "$MNT"
    fsck_clean
    mount -t ext4 "$DEV" "$MNT"
    (cd "$MNT/data" && sha256sum -c /tmp/synced >/tmp/verify 2>&1) || { cat /tmp/verify; say "ERROR fsynced data lost"; return 1; }
    umount "$MNT"
    detach
    bad="I/O error|EXT4-fs error|Aborting journal|aborted journal|Receive control failed|Send control failed|timed out"
    if dmesg | grep -E "$bad" >/tmp/kernel; then
        cat /tmp/kernel
        say "ERROR the kernel saw errors"
        return 1
    fi
    say "UPGRADED 10 times under $(wc -l </tmp/synced) fsynced files ($*)"
}

upgrade_under_writes
upgrade_under_writes -C 4
