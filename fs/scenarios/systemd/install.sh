# Install as the README says: its "Installing as a service" lines, run as they are, from the checkout.
# The guest has no network: apt finds python3-venv installed, and pip takes its wheels from the payload.
. scenarios/_lib.sh
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/payload/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
awk '/<!-- install-as-service/ { found = 1; next }
     found && /^```sh/ { block = 1; next }
     block && /^```/ { exit }
     block { print }' src/README.md >/tmp/install.sh
[ -s /tmp/install.sh ] || fail "the README has no install-as-service block"
cd src
sh -ex /tmp/install.sh >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "an install step failed"; }
grep '^+ ' /tmp/install.log
say "INSTALLED $(/opt/nbdserver/bin/nbdserver --version)"
