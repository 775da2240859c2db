# Socket activation: with nbdserver.socket listening and the service stopped, the first client
# starts the service and is served through the socket systemd hands it.
. scenarios/_lib.sh
if [ "$(systemctl is-enabled nbdserver.socket)" != enabled ]; then
    # The package installs the sockets without enabling them: switched to as docs/systemd.md says.
    systemctl stop nbdserver.service
    systemctl enable --now nbdserver.socket nbdserver-metrics.socket
    systemctl start nbdserver.service
fi
systemctl stop nbdserver.service
[ "$(unit ActiveState)" = inactive ] || fail "still $(unit ActiveState) after stop"
[ "$(systemctl show -p ActiveState --value nbdserver.socket)" = active ] || fail "the socket is not listening"
nbd-client -l 127.0.0.1 10809 >/tmp/list 2>&1 || { cat /tmp/list; fail "the first client was not served"; }
grep -q '^disk' /tmp/list || { cat /tmp/list; fail "no export disk in the list"; }
[ "$(unit ActiveState)" = active ] || fail "the first client did not start the service"
journal | grep -q "listening on 127.0.0.1:10809" || fail "not the inherited socket"
journal | grep -q "metrics on http://127.0.0.1:10810/metrics" || fail "/metrics not on its inherited socket"
# A scrape with the service stopped starts it too, through the metrics socket.
systemctl stop nbdserver.service
metrics | grep -q '^nbdserver_connections_total' || fail "a scrape did not start the service"
[ "$(unit ActiveState)" = active ] || fail "the scrape did not start the service"
say "ACTIVATED by the first client and by a scrape: $(unit StatusText)"
