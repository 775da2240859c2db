# Install without the package, as docs/systemd.md says: its "Without the package" lines, run as they
# are from the checkout; the example configuration's export is then served.
# The guest has no network: apt finds python3-venv installed, and pip takes its wheels from the payload.
. scenarios/_lib.sh
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/payload/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
block install-as-service src/docs/systemd.md >/tmp/install.sh
[ -s /tmp/install.sh ] || fail "docs/systemd.md has no install-as-service block"
cd src
sh -ex /tmp/install.sh >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "an install step failed"; }
grep '^+ ' /tmp/install.log
wait_active || { journalctl -b --no-pager -o short -u nbdserver | tail -n 40; fail "not active after install"; }
nbd-client -l 127.0.0.1 10809 | grep -q '^disk' || fail "the example's export is not served"
say "INSTALLED $(/opt/nbdserver/bin/nbdserver --version)"
