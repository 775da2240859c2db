# apt purge: the service and its sockets (enabled by the socket scenario) stopped, and nothing left
# behind: no program, units, enabled sockets, configuration, state, user or process.
. scenarios/_lib.sh
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q nbdserver >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; fail "apt purge"; }
systemctl daemon-reload
for unit in nbdserver.service nbdserver.socket nbdserver-metrics.socket; do
    [ "$(systemctl show -p ActiveState --value $unit)" = inactive ] || fail "$unit is $(systemctl show -p ActiveState --value $unit)"
done
[ "$(systemctl show -p LoadState --value nbdserver)" = not-found ] || fail "the unit is still there"
pgrep -u nbdserver >/dev/null 2>&1 && fail "processes of nbdserver are left"
for path in /usr/bin/nbdserver /etc/nbdserver /var/lib/nbdserver /lib/systemd/system/nbdserver.service \
    /lib/systemd/system/nbdserver.socket /etc/systemd/system/sockets.target.wants/nbdserver.socket /usr/lib/sysusers.d/nbdserver.conf /usr/lib/python3/dist-packages/nbdserver; do
    [ ! -e "$path" ] || fail "$path is left"
done
getent passwd nbdserver >/dev/null && fail "the user is left"
getent group nbdserver >/dev/null && fail "the group is left"
dpkg-query -W nbdserver >/dev/null 2>&1 && fail "dpkg still knows the package"
say "PURGED"
