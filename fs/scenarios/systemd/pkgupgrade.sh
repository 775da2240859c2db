# apt install of the next version of the package under ext4 mounted through the kernel's
# nbd-client, fsynced writes going on: the service is restarted, not stopped and started, and the
# restart keeps the connection through systemd's fd store: no write fails, the kernel logs no
# error, every fsynced file is intact and e2fsck -fn is clean.
. scenarios/_lib.sh
. scenarios/_writer.sh
next=$(packages | tail -n 1)
writing_ext4
before=$(unit MainPID)
random_pause
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "./$next" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; fail "apt install of the next version"; }
wait_active || { journal; fail "not active after the upgrade"; }
[ "$(unit MainPID)" != "$before" ] || fail "the upgrade did not restart the service"
sleep 1
written_intact
journal | grep -q "took over 1 connection" || fail "the new version did not take the connection over"
say "UPGRADED to $(dpkg-query -W -f='${Version}' nbdserver) under $(wc -l </tmp/synced) fsynced files; pause $(journal | sed -n 's/.*requests waited \([0-9.]*\) s.*/\1/p' | tail -n 1) s"
