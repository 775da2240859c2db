# The sandbox costs no feature: a block device (a loop device, group disk) given as an export is
# opened by the service, which runs as nbdserver with SupplementaryGroups=disk, and served.
. scenarios/_lib.sh
truncate -s 64M /var/tmp/block.img
modprobe loop
dev=$(losetup -f --show /var/tmp/block.img)
printf 'nbdserver' | dd of="$dev" bs=512 seek=8 conv=notrunc 2>/dev/null
ls -l "$dev"
config=/etc/nbdserver/nbdserver.toml
cp -p $config /tmp/before-block.toml
printf '\n[[export]]\nname = "block"\npath = "%s"\n' "$dev" >>$config
systemctl reload nbdserver
logged "export 'block' added" || { journal | tail -n 5; fail "the block device was not opened"; }
modprobe nbd
nbd-client 127.0.0.1 10809 /dev/nbd1 -N block >/dev/null 2>&1 || fail "cannot attach the block export"
tries=0
until [ "$(cat /sys/block/nbd1/size)" -gt 0 ]; do tries=$((tries + 1)); [ $tries -lt 100 ] || fail "no size"; sleep 0.1; done
[ "$(dd if=/dev/nbd1 bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 9)" = nbdserver ] || fail "read the wrong data"
nbd-client -d /dev/nbd1 >/dev/null
cp -p /tmp/before-block.toml $config
say "BLOCK device $dev served: $(journal | grep "export 'block': " | tail -n 1)"
