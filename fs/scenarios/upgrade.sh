# The server upgraded in place (SIGUSR2) ten times at random moments while ext4 on it is written
# with fsync, through one connection and then through four (nbd-client -C 4): no write fails, the
# kernel logs no I/O error, no ext4 error and no aborted journal, every fsynced file is intact, and
# e2fsck -fn is clean. No timeout is set: a request the server dropped would hang, not pass.
. /scenarios/_lib.sh
. /scenarios/_writer.sh

upgrade_under_writes() {
    dmesg -c >/dev/null  # what an earlier scenario made the kernel say is not this one's
    attach -b 4096 "$@"
    mkfs.ext4 -q -F "$DEV"
    mount -t ext4 "$DEV" "$MNT"
    mkdir "$MNT/data"
    start_writer "$MNT/data"
    n=0
    while [ $n -lt 10 ]; do
        random_pause
        host upgrade
        n=$((n + 1))
    done
    stop_writer
    umount "$MNT"
    fsck_clean
    mount -t ext4 "$DEV" "$MNT"
    verify_synced "$MNT/data"
    umount "$MNT"
    detach
    kernel_clean
    say "UPGRADED 10 times under $(wc -l </tmp/synced) fsynced files ($*)"
}

upgrade_under_writes
upgrade_under_writes -C 4
