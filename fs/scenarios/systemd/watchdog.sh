# The watchdog: a server that stops answering (SIGSTOP) is killed and restarted by systemd within
# WatchdogSec (shortened by a drop-in), and clients can connect again.
. scenarios/_lib.sh
mkdir -p /etc/systemd/system/nbdserver.service.d
printf '[Service]\nWatchdogSec=4\n' >/etc/systemd/system/nbdserver.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart nbdserver
pid=$(unit MainPID)
before=$(unit NRestarts)
stopped=$(cut -d' ' -f1 /proc/uptime)
kill -STOP "$pid"
tries=0
until [ "$(unit MainPID)" != "$pid" ] && [ "$(unit MainPID)" != 0 ] && [ "$(unit ActiveState)" = active ]; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || fail "not restarted within 60 s"; sleep 0.1
done
back=$(cut -d' ' -f1 /proc/uptime)
[ "$(unit NRestarts)" -eq $((before + 1)) ] || fail "NRestarts $before -> $(unit NRestarts)"
journalctl -q -u nbdserver | grep -i watchdog | tail -n 2
nbd-client -l 127.0.0.1 10809 | grep -q '^disk' || fail "clients cannot connect after the restart"
rm /etc/systemd/system/nbdserver.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart nbdserver
say "WATCHDOG restarted the stopped server in $(awk "BEGIN { print $back - $stopped }") s (WatchdogSec=4), NRestarts $before -> $((before + 1))"
