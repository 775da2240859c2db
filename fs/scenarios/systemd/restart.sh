# systemctl restart under ext4 mounted through the kernel's nbd-client, with fsynced writes going
# on: the connection waits in systemd's fd store, so no write fails, the kernel logs no I/O or ext4
# error, every fsynced file is intact and e2fsck -fn is clean. No timeout is set: a request the
# server dropped would hang, not pass.
. scenarios/_lib.sh
. scenarios/_writer.sh
writing_ext4
n=0
while [ $n -lt 3 ]; do
    random_pause
    systemctl restart nbdserver
    [ "$(unit ActiveState)" = active ] || fail "not active after restart $n"
    n=$((n + 1))
done
sleep 1
written_intact
journal | grep -E "kept in the fd store|took over" || fail "the journal tells of no handover"
[ "$(journal | grep -c 'took over 1 connection')" -ge 3 ] || fail "not every restart took the connection over"
say "RESTARTED 3 times under $(wc -l </tmp/synced) fsynced files; pauses: $(journal | sed -n 's/.*requests waited \([0-9.]*\) s.*/\1/p' | tr '\n' ' ')"
