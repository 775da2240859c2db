# The service as installed: active only after READY=1 (Type=notify), STATUS= shown, running as its
# own user in its sandbox with io_uring still chosen, the journal with the server's priorities,
# and /metrics served.
. scenarios/_lib.sh
[ "$(unit ActiveState)" = active ] || { systemctl status nbdserver; fail "not active"; }
[ "$(unit Type)" = notify ] || fail "Type=$(unit Type)"
case "$(unit StatusText)" in *"export(s)"*) ;; *) fail "StatusText=$(unit StatusText)" ;; esac
pid=$(unit MainPID)
[ "$(ps -o user= -p "$pid")" = nbdserver ] || fail "runs as $(ps -o user= -p "$pid")"
journal -p info..info | grep -q "ready:" || fail "no ready: line at priority info"
journal | grep "export 'disk'" || fail "no export line"
journal | grep -q "engine uring" || fail "not io_uring under the sandbox: $(journal | grep export)"
[ -z "$(journal -p 0..3)" ] || fail "errors in the journal: $(journal -p 0..3)"
metrics | grep -q '^nbdserver_export_size_bytes{export="disk"} 1.073741824e+09' || fail "no /metrics"
say "STATUS $(unit StatusText)"
