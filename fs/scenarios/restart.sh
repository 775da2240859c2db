# The server restarted (SIGTERM, then started again) while a client is attached: what was written and
# synced before is there after reattaching, and the filesystem is clean.
#
# The client cannot ride through the restart: when the server closes the connection the kernel
# (6.1) ends NBD_DO_IT without an error, so nbd-client -persist (3.24) exits instead of reconnecting
# (it reconnects only after a timeout), and I/O issued meanwhile fails with EIO. So the filesystem is
# unmounted across the restart and the device reattached by hand, as an admin would.
. /scenarios/_lib.sh
attach -b 4096 -t 5
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" "$MNT"
make_tree "$MNT/before"
sync
checksums "$MNT" >/tmp/sums
umount "$MNT"
host restart
tries=0
until [ "$(dd if="$DEV" bs=4k count=1 iflag=direct 2>/dev/null | wc -c)" -eq 0 ]; do
    tries=$((tries + 1))
    [ $tries -lt 100 ] || { say "ERROR the device still reads after the server went away"; exit 1; }
    sleep 0.1  # the kernel notices the closed connection
done
detach
tries=0
until attach -b 4096 -t 5; do
    tries=$((tries + 1))
    [ $tries -lt 30 ] || { say "ERROR the server did not come back"; exit 1; }
    sleep 1
done
mount -t ext4 "$DEV" "$MNT"
checksums "$MNT" | cmp - /tmp/sums || { say "ERROR files changed across the restart"; exit 1; }
make_tree "$MNT/after"
sync
umount "$MNT"
fsck_clean
detach
