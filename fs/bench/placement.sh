#!/usr/bin/env bash
# One request at a time (fio's nbd engine, 4k, QD1) against nbdserver or nbdkit, with the server
# and fio pinned to given CPUs (or not): where the two sit decides the round trip more than either
# server's code does.  Prints fio's IOPS and the server's CPU ticks over 3 s of the run.
#
#   fs/bench/placement.sh nbdserver|nbdkit randwrite|randread [SERVER_CPU FIO_CPU]
#   NBDSERVER_ARGS="--busy-poll 0" fs/bench/placement.sh nbdserver randwrite 0 1
#
# nbdserver runs from the compiled tree of fs/bench/builds.py; nbdkit is this machine's (Debian 12's).
set -euo pipefail
cd "$(dirname "$0")/../.."
server=$1 rw=$2
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
    *) echo "nbdserver or nbdkit" >&2; exit 2 ;;
esac
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
sleep 1.5
"${fpin[@]}" fio --name=q --ioengine=nbd --uri=nbd://127.0.0.1:$port/ --rw="$rw" --bs=4k --iodepth=1 \
    --size=512m --time_based --runtime=5 --thread --output-format=terse \
    | awk -F';' 'NF > 50 {print "IOPS", $8 + $49}' &
fio=$!
sleep 1
before=$(awk '{print $14 + $15}' /proc/$pid/stat)
sleep 3
after=$(awk '{print $14 + $15}' /proc/$pid/stat)
echo "server CPU ticks in 3 s: $((after - before))"
wait $fio
