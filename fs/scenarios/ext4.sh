# ext4 through one connection with 4 KiB blocks: mkfs, a tree of files and a 16 MiB direct write,
# sync, checksums, umount, e2fsck -fn clean, remount, checksums again.
. /scenarios/_lib.sh
exercise -b 4096
