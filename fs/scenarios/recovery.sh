# Crash recovery: the server runs with worker processes (--processes 2), and a worker serving this
# guest is killed with SIGKILL ten times at random moments while ext4 on the export is written with
# fsync, through one connection and then through four (nbd-client -C 4). Each time the primary
# starts a replacement that takes the connections over from the exact byte (nbdserver/process/
# recovery.py), so the kernel client sees a pause and nothing else: no write fails, the kernel logs
# no I/O error, no ext4 error, no aborted journal and no NBD complaint, every fsynced file is intact,
# and e2fsck -fn is clean (under_writes in _lib.sh). The host (tests/e2e/test_guest.py) answers
# `kill-worker` once the primary has logged that the replacement took the connections over.
. /scenarios/_lib.sh
. /scenarios/_writer.sh

for options in "" "-C 4"; do
    # A timeout, unlike the upgrade scenario: a request the server never answers (a connection closed
    # instead of taken over, a stream resumed at the wrong byte) then fails the scenario within 30 s,
    # the kernel saying "timed out", rather than hanging the guest; a recovery's pause is about 1 s.
    # shellcheck disable=SC2086  # the options are words
    under_writes kill-worker 10 -t 30 $options
    say "RECOVERED from 10 kills under $(wc -l </tmp/synced) fsynced files ($options)"
done
