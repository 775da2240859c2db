# The server restarted (SIGTERM, then started again) under a connected client with -persist:
# nbd-client reconnects and the filesystem carries on.
. /scenarios/_lib.sh
attach -b 4096 -nonetlink -persist
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" "$MNT"
make_tree "$MNT/before"
sync
checksums "$MNT" >/tmp/sums
host restart
sleep 5  # the host stops and starts the server meanwhile
make_tree "$MNT/after"
sync
(cd "$MNT" && sha256sum -c /tmp/sums >/dev/null) || { say "ERROR data written before the restart changed"; exit 1; }
umount "$MNT"
fsck_clean
detach
