#!/bin/busybox sh
# Stage one of the systemd guest: load what reaching the root disk takes, mount it, put this run's
# payload (the server's wheels, the deploy/ files, the README, the scenarios) into /root/payload,
# and hand over to systemd as PID 1.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 4 > /proc/sys/kernel/printk
while read -r module; do
    insmod "/lib/modules/$module" || echo "@@ WARN cannot load $module"
done < /lib/modules/load-order
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot; then
    echo "@@ ERROR cannot mount the root disk"
    poweroff -f
fi
rm -rf /newroot/root/payload
cp -a /payload /newroot/root/payload
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
