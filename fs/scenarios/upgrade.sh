# The server upgraded in place (SIGUSR2) ten times at random moments while ext4 on it is written
# with fsync, through one connection and then through four (nbd-client -C 4): no write fails, the
# kernel logs no I/O error, no ext4 error, no aborted journal and no NBD complaint, every fsynced
# file is intact, and e2fsck -fn is clean (under_writes in _lib.sh).
. /scenarios/_lib.sh
. /scenarios/_writer.sh

for options in "" "-C 4"; do
    # shellcheck disable=SC2086  # the options are words
    under_writes upgrade 10 $options
    say "UPGRADED 10 times under $(wc -l </tmp/synced) fsynced files ($options)"
done
