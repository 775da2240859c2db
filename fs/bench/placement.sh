#!/usr/bin/env bash
# 4k requests (fio's nbd engine, QD1 unless IODEPTH says otherwise) against nbdserver or nbdkit,
# with the server and fio pinned to given CPUs (or not): where the two sit decides the round trip,
# and on two CPUs the queued rates, more than either server's code does.  Prints fio's IOPS and
# its own CPU use, and the server's CPU ticks over 3 s of the run.
#
#   fs/bench/placement.sh nbdserver|nbdkit|nbdkit-current randwrite|randread|write|read [SERVER_CPU FIO_CPU]
#   NBDSERVER_ARGS="--busy-poll 0" fs/bench/placement.sh nbdserver randwrite 0 1
#   IODEPTH=32 fs/bench/placement.sh nbdkit-current write 0 1
#
# nbdserver runs from the compiled tree of fs/bench/builds.py (one process); nbdkit is this
# machine's (Debian 12's), nbdkit-current the Debian 13 chroot's (fs/chroot/current.py build).
set -euo pipefail
cd "$(dirname "$0")/../.."
server=$1 rw=$2 iodepth=${IODEPTH:-1}
spin=() fpin=()
if [ $# -ge 4 ]; then spin=(taskset -c "$3"); fpin=(taskset -c "$4"); fi
image=/dev/shm/placement.img
if [ ! -f $image ]; then
    truncate -s 1G $image
    dd if=/dev/urandom of=$image bs=1M count=1024 conv=notrunc status=none
fi
port=10911
tree=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "fs/bench"); import builds; print(builds.compiled_tree())')
case $server in
    nbdserver)
        (cd "$tree" && exec "${spin[@]}" "$OLDPWD/.venv/bin/python" -m nbdserver serve --processes 1 \
            --listen 127.0.0.1:$port --no-metrics ${NBDSERVER_ARGS:-} $image) >/dev/null 2>&1 &
        ;;
    nbdkit) "${spin[@]}" nbdkit -f -p $port -i 127.0.0.1 file $image >/dev/null 2>&1 & ;;
    # The chroot's runner keeps its PID: $! is nbdkit's.
    nbdkit-current)
        "${spin[@]}" .venv/bin/python fs/chroot/current.py run --bind /dev/shm -- \
            nbdkit -f -p $port -i 127.0.0.1 file $image >/dev/null 2>&1 &
        ;;
    *) echo "nbdserver, nbdkit or nbdkit-current" >&2; exit 2 ;;
esac
pid=$!
report=$(mktemp)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f $report' EXIT
sleep 1.5
"${fpin[@]}" fio --name=q --ioengine=nbd --uri=nbd://127.0.0.1:$port/ --rw="$rw" --bs=4k --iodepth="$iodepth" \
    --size=512m --time_based --runtime=5 --output-format=json >"$report" 2>/dev/null &
fio=$!
sleep 1
before=$(awk '{print $14 + $15}' /proc/$pid/stat)
sleep 3
after=$(awk '{print $14 + $15}' /proc/$pid/stat)
wait $fio
python3 - "$report" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]  # the nbd engine prints a line before the JSON
iops = job["read"]["iops"] + job["write"]["iops"]
print(f"IOPS {iops:.0f}, fio's CPU {job['usr_cpu'] + job['sys_cpu']:.0f} %")
EOF
echo "server CPU ticks in 3 s: $((after - before))"
