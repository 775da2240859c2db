# systemctl reload: a new export and an export made read-only are applied at once; a configuration
# that does not parse changes nothing and is reported; the old file again undoes both.
. scenarios/_lib.sh
config=/etc/nbdserver/nbdserver.toml
cp -p $config /tmp/original.toml
# Whatever happens here, the scenarios after this one find the configuration they started with.
trap 'cp -p /tmp/original.toml $config; systemctl reload nbdserver' EXIT
pid=$(unit MainPID)
sed -i '/^name = "disk"/a read-only = true' $config
printf '\n[[export]]\nname = "extra"\npath = "/var/lib/nbdserver/extra.img"\nsize = "64M"\n' >>$config
systemctl reload nbdserver
logged "export 'extra' added" || fail "the new export was not added"
logged "export 'disk' read-only" || fail "disk was not made read-only"
nbd-client -l 127.0.0.1 10809 | grep -q '^extra' || fail "extra is not listed"
echo 'not toml [' >>$config
systemctl reload nbdserver
logged "reload failed, configuration unchanged" || fail "a bad configuration was not reported"
[ "$(unit ActiveState)" = active ] && [ "$(unit MainPID)" = "$pid" ] || fail "a bad configuration stopped the server"
cp -p /tmp/original.toml $config
systemctl reload nbdserver
logged "export 'disk' writable" || fail "disk was not made writable again"
trap - EXIT
say "RELOADED: $(journal | grep '^reloaded:' | tail -n 1)"
