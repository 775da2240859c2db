# systemctl restart under ext4 mounted through the kernel's nbd-client, with fsynced writes going
# on: the connection waits in systemd's fd store, so no write fails, the kernel logs no I/O or ext4
# error, every fsynced file is intact and e2fsck -fn is clean. No timeout is set: a request the
# server dropped would hang, not pass.
. scenarios/_lib.sh
. scenarios/_writer.sh
modprobe nbd
dmesg -c >/dev/null
nbd-client 127.0.0.1 10809 /dev/nbd0 -b 4096 -N disk >/tmp/nbd-client.log 2>&1 || { cat /tmp/nbd-client.log; fail "nbd-client"; }
tries=0
until [ "$(cat /sys/block/nbd0/size)" -gt 0 ]; do
    tries=$((tries + 1)); [ $tries -lt 100 ] || fail "/dev/nbd0 has no size"; sleep 0.1
done
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/disk
mount -t ext4 /dev/nbd0 /mnt/disk
mkdir /mnt/disk/data
start_writer /mnt/disk/data
n=0
while [ $n -lt 3 ]; do
    random_pause
    systemctl restart nbdserver
    [ "$(unit ActiveState)" = active ] || fail "not active after restart $n"
    n=$((n + 1))
done
sleep 1
stop_writer
umount /mnt/disk
e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck found problems"; }
mount -t ext4 /dev/nbd0 /mnt/disk
verify_synced /mnt/disk/data
umount /mnt/disk
nbd-client -d /dev/nbd0 >/dev/null
kernel_clean
journal | grep -E "kept in the fd store|took over" || fail "the journal tells of no handover"
[ "$(journal | grep -c 'took over 1 connection')" -ge 3 ] || fail "not every restart took the connection over"
say "RESTARTED 3 times under $(wc -l </tmp/synced) fsynced files; pauses: $(journal | sed -n 's/.*requests waited \([0-9.]*\) s.*/\1/p' | tr '\n' ' ')"
