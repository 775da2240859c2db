# A crash of the whole service under ext4 mounted through the kernel's nbd-client, with fsynced
# writes going on: `systemctl kill -s KILL nbdserver` (the primary and its workers at once) five
# times, once more after an upgrade in place (SIGUSR2), then the watchdog's abort of a server that
# stopped answering (SIGSTOP past WatchdogSec=).
# Each time systemd restarts the service (Restart=on-failure) and the new primary takes the
# connection over from what the fd store kept (nbdserver/process/keeper.py): no write fails, the
# kernel logs no I/O error, no ext4 error, no aborted journal and no NBD complaint, every fsynced
# file is intact, and e2fsck -fn is clean. A timeout of 60 s: a request the server never answers
# fails the scenario rather than hanging the guest.
. scenarios/_lib.sh
. scenarios/_writer.sh
trap '[ $? -eq 0 ] || journal | tail -n 200' EXIT  # what the server said, should it fail

# restarted PID: wait until systemd has started the service again and it took the connection over.
restarted() {
    tries=0
    until [ "$(unit MainPID)" != "$1" ] && [ "$(unit MainPID)" != 0 ] && [ "$(unit ActiveState)" = active ]; do
        tries=$((tries + 1)); [ $tries -lt 600 ] || fail "not restarted within 60 s"; sleep 0.1
    done
    tries=0
    until journal _PID="$(unit MainPID)" | grep -q "took over 1 connection(s) of its predecessor"; do
        tries=$((tries + 1)); [ $tries -lt 300 ] || fail "the connection was not taken over"
        sleep 0.1
    done
}

writing_ext4 -t 60
n=0
while [ $n -lt 5 ]; do
    sleep 1
    random_pause
    pid=$(unit MainPID)
    killed=$(cut -d' ' -f1 /proc/uptime)
    systemctl kill -s KILL nbdserver
    restarted "$pid"
    pauses="$pauses $(awk "BEGIN { print $(cut -d' ' -f1 /proc/uptime) - $killed }")"
    n=$((n + 1))
done

# An upgrade in place, then a crash: the successor keeps the connection in the store anew (the
# predecessor took its own copies out before it named the successor the main process).
pid=$(unit MainPID)
systemctl kill --kill-whom=main -s USR2 nbdserver
tries=0
until [ "$(unit MainPID)" != "$pid" ] && journal _PID="$(unit MainPID)" | grep -q "took over 1 connection(s); requests waited"; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || fail "the upgrade did not take the connection over within 60 s"; sleep 0.1
done
sleep 1
pid=$(unit MainPID)
systemctl kill -s KILL nbdserver
restarted "$pid"

mkdir -p /etc/systemd/system/nbdserver.service.d
printf '[Service]\nWatchdogSec=4\n' >/etc/systemd/system/nbdserver.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart nbdserver  # (through the fd store) with the shorter watchdog
[ "$(unit ActiveState)" = active ] || fail "not active after the restart"
sleep 1
pid=$(unit MainPID)
stopped=$(cut -d' ' -f1 /proc/uptime)
kill -STOP "$pid"
restarted "$pid"
watchdog=$(awk "BEGIN { print $(cut -d' ' -f1 /proc/uptime) - $stopped }")
rm /etc/systemd/system/nbdserver.service.d/watchdog.conf
systemctl daemon-reload
sleep 1

written_intact
systemctl restart nbdserver  # the usual watchdog again
say "CRASHED 5 times (systemctl kill -s KILL), once after an upgrade, and aborted once by the watchdog under $(wc -l </tmp/synced) fsynced files; pauses from the kill to the connection taken over:$pauses s; from SIGSTOP (WatchdogSec=4): $watchdog s"
