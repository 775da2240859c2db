# Shared by the systemd guest's scenarios (run by /root/payload/run as root, with `sh -e`).
say() { echo "@@ $*"; }
fail() { say "ERROR $*"; exit 1; }
unit() { systemctl show -p "$1" --value nbdserver; }
journal() { journalctl -q -u nbdserver --output=cat "$@"; }
metrics() { python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:10810/metrics").read().decode())'; }
