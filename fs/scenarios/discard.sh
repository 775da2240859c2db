# TRIM from the filesystem: mkfs discards the whole device, fstrim the free space, and
# `mount -o discard` frees the blocks of deleted files as they go. The host counts the TRIMs
# between the marks.
. /scenarios/_lib.sh
attach -b 4096
host mark discard-mkfs
mkfs.ext4 -q -F "$DEV"
host mark discard-mkfs-done
mount -t ext4 "$DEV" "$MNT"
make_tree "$MNT/tree"
sync
fstrim -v "$MNT"
host mark discard-fstrim-done
umount "$MNT"
mount -t ext4 -o discard "$DEV" "$MNT"
make_tree "$MNT/more"
sync
host mark discard-online
rm -r "$MNT/more"
sync
sleep 6  # the journal commits (and discards) every 5 s
sync
host mark discard-online-done
umount "$MNT"
fsck_clean
detach
