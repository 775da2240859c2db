# The server killed (SIGKILL) in the middle of fsynced writes, then restarted: reattach, the journal
# replays, e2fsck -fn is clean, and every file whose fsync returned before the kill is intact.
. /scenarios/_lib.sh
# A timeout: without one the kernel keeps requests of a dead connection waiting forever.
attach -b 4096 -t 5
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" "$MNT"
mkdir "$MNT/data"
: >/tmp/synced
i=0
killed=no
while [ $i -lt 4000 ]; do
    if ! dd if=/dev/urandom of="$MNT/data/f$i" bs=64k count=1 conv=fsync 2>/dev/null; then
        killed=yes
        break
    fi
    (cd "$MNT/data" && sha256sum "f$i") >>/tmp/synced
    [ $i -eq 24 ] && host kill
    i=$((i + 1))
done
[ $killed = yes ] || { say "ERROR the server was never killed"; exit 1; }
say "WRITES $(wc -l < /tmp/synced) fsynced before the kill"
umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
detach
tries=0
until attach -b 4096; do
    tries=$((tries + 1))
    [ $tries -lt 60 ] || { say "ERROR the server did not come back"; exit 1; }
    sleep 1
done
mount -t ext4 "$DEV" "$MNT"  # replays the journal
(cd "$MNT/data" && sha256sum -c /tmp/synced >/tmp/verify 2>&1) || { cat /tmp/verify; say "ERROR fsynced data lost"; exit 1; }
umount "$MNT"
fsck_clean
detach
