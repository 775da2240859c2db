# The Debian package, installed as an admin installs it (apt install ./nbdserver_*.deb, no network:
# its dependencies are in the guest already): the service starts on its own with the packaged
# configuration, which exports nothing, as its user in its sandbox; the manual pages are there;
# an export added with nbdserver ctl is served, and kept in the state directory.
. scenarios/_lib.sh
first=$(packages | head -n 1)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "./$first" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; fail "apt install"; }
wait_active || { journalctl -b --no-pager -o short -u nbdserver | tail -n 40; fail "not active after install"; }
[ "$(unit Type)" = notify ] || fail "Type=$(unit Type)"
[ "$(ps -o user= -p "$(unit MainPID)")" = nbdserver ] || fail "runs as $(ps -o user= -p "$(unit MainPID)")"
journal | grep -q "no exports yet" || fail "the journal does not say it exports nothing"
[ -s /usr/share/man/man8/nbdserver.8.gz ] && [ -s /usr/share/man/man5/nbdserver.toml.5.gz ] || fail "no manual pages"
dpkg-query -W -f='${Conffiles}' nbdserver | grep -q /etc/nbdserver/nbdserver.toml || fail "no conffile"
/usr/bin/nbdserver --version | grep -q "from /usr/lib/python3/dist-packages/nbdserver" || fail "$(/usr/bin/nbdserver --version)"
nbdserver ctl export add disk /var/lib/nbdserver/disk.img --size 1G || fail "ctl export add"
grep -q '"disk"' /var/lib/nbdserver/exports.json || fail "the export is not kept in the state directory"
nbdserver ctl status | grep -q "^disk " || fail "not served: $(nbdserver ctl status)"
say "PACKAGED $(dpkg-query -W nbdserver), $(du -sk /usr/lib/python3/dist-packages/nbdserver | cut -f1) KiB of Python"
