# The Debian package, installed as the README says: its "Installing as a service" install lines,
# run as they are from a clone's directory with the older of the payload's two builds beside it
# (../nbdserver_*_all.deb; no network: its dependencies are in the guest already). Before the
# export is added, the service started on its own with the packaged configuration, exporting
# nothing, as its user in its sandbox; the manual pages and the conffile are there; an export added
# with nbdserver ctl is served and kept in the state directory; then the README's export is served.
. scenarios/_lib.sh
export DEBIAN_FRONTEND=noninteractive
block package-install src/README.md >/tmp/package.sh
[ -s /tmp/package.sh ] || fail "the README has no package-install block"
mkdir -p /tmp/clone/src
cp "$(packages | head -n 1)" /tmp/clone/
(cd /tmp/clone/src && sh -ex /tmp/package.sh) >/tmp/package.log 2>&1 || { cat /tmp/package.log; fail "an install step failed"; }
grep '^+ ' /tmp/package.log
wait_active || { journalctl -b --no-pager -o short -u nbdserver | tail -n 40; fail "not active after install"; }
[ "$(unit Type)" = notify ] || fail "Type=$(unit Type)"
[ "$(ps -o user= -p "$(unit MainPID)")" = nbdserver ] || fail "runs as $(ps -o user= -p "$(unit MainPID)")"
journal | grep -q "no exports yet" || fail "the journal does not say it started exporting nothing"
logged "export 'disk' added" || { journal | tail -n 20; fail "the README's export was not added"; }
[ -s /usr/share/man/man8/nbdserver.8.gz ] && [ -s /usr/share/man/man5/nbdserver.toml.5.gz ] || fail "no manual pages"
dpkg-query -W -f='${Conffiles}' nbdserver | grep -q /etc/nbdserver/nbdserver.toml || fail "no conffile"
/usr/bin/nbdserver --version | grep -q "from /usr/lib/python3/dist-packages/nbdserver" || fail "$(/usr/bin/nbdserver --version)"
nbdserver ctl export add scratch /var/lib/nbdserver/scratch.img --size 64M || fail "ctl export add"
grep -q '"scratch"' /var/lib/nbdserver/exports.json || fail "the export is not kept in the state directory"
nbdserver ctl status | grep -q "^scratch " || fail "not served: $(nbdserver ctl status)"
nbdserver ctl export remove scratch || fail "ctl export remove"
nbd-client -l 127.0.0.1 10809 >/tmp/list 2>&1 || { cat /tmp/list; fail "nbd-client -l"; }
grep -q '^disk' /tmp/list && ! grep -q '^scratch' /tmp/list || { cat /tmp/list; fail "not the exports expected"; }
say "PACKAGED $(dpkg-query -W nbdserver), $(du -sk /usr/lib/python3/dist-packages/nbdserver | cut -f1) KiB of Python"
