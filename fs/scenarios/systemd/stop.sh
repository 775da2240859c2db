# systemctl stop: exit status 0, nothing of the service left running, the backing file flushed.
. scenarios/_lib.sh
[ "$(unit ActiveState)" = active ] || fail "not running before the stop"
systemctl stop nbdserver.socket nbdserver.service
[ "$(unit ActiveState)" = inactive ] || fail "ActiveState=$(unit ActiveState)"
[ "$(unit ExecMainStatus)" = 0 ] || fail "exit status $(unit ExecMainStatus)"
[ "$(unit Result)" = success ] || fail "Result=$(unit Result)"
! pgrep -u nbdserver >/dev/null || fail "left running: $(pgrep -a -u nbdserver)"
journal | grep -q "shutting down" || fail "no clean shutdown in the journal"
journal | tail -n 3
say "STOPPED $(unit Result), exit status $(unit ExecMainStatus)"
