# Shared by the scenarios of both guests: a writer of fsynced files while the server is changed
# under it, and what must hold afterwards.

# start_writer DIR: files of 16 to 128 KiB written into DIR, each with fsync, until stop_writer.
# The checksum of each file whose fsync returned goes to /tmp/synced; a failed write to /tmp/failed.
start_writer() {
    : >/tmp/synced
    : >/tmp/failed
    rm -f /tmp/stop
    (
        i=0
        while [ ! -e /tmp/stop ]; do
            if dd if=/dev/urandom of="$1/f$i" bs=16k count=$((i % 8 + 1)) conv=fsync 2>/dev/null; then
                (cd "$1" && sha256sum "f$i") >>/tmp/synced
            else
                echo "f$i" >>/tmp/failed
            fi
            i=$((i + 1))
        done
    ) &
    writer=$!
}

# stop_writer: stop it; fails if any write failed.
stop_writer() {
    touch /tmp/stop
    wait $writer
    [ ! -s /tmp/failed ] || { echo "@@ ERROR writes failed: $(cat /tmp/failed)"; return 1; }
}

# verify_synced DIR: every file whose fsync returned is intact.
verify_synced() {
    (cd "$1" && sha256sum -c /tmp/synced >/tmp/verify 2>&1) || { cat /tmp/verify; echo "@@ ERROR fsynced data lost"; return 1; }
}

# kernel_clean: since `dmesg -c`, the kernel logged no I/O error, ext4 error, aborted journal or
# failed NBD request.
kernel_clean() {
    bad="I/O error|EXT4-fs error|Aborting journal|aborted journal|Receive control failed|Send control failed|timed out"
    if dmesg | grep -E "$bad" >/tmp/kernel; then
        cat /tmp/kernel
        echo "@@ ERROR the kernel saw errors"
        return 1
    fi
}

# random_pause: up to 0.9 s.
random_pause() { sleep "0.$(($(od -An -N1 -tu1 /dev/urandom) % 10))"; }
