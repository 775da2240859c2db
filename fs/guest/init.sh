#!/bin/busybox sh
# The guest's init: mount the pseudo filesystems, load the modules, bring up the network,
# run the scenarios listed in /scenarios/run, report each, power off.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
echo 4 > /proc/sys/kernel/printk  # kernel errors still reach the console, chatter does not

while read -r module; do
    insmod "/lib/modules/$module" || echo "@@ WARN cannot load $module"
done < /lib/modules/load-order

ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
echo "@@ BOOTED $(cat /etc/release) $(nproc) cpu(s)"

for name in $(cat /scenarios/run); do
    echo "@@ START $name"
    echo "@@ HOST mark start-$name" && read -r _done  # the host answers once it has taken its snapshot
    started=$(cut -d' ' -f1 /proc/uptime)
    if sh -e "/scenarios/$name.sh"; then outcome=PASS; else outcome=FAIL; fi
    ended=$(cut -d' ' -f1 /proc/uptime)
    echo "@@ HOST mark end-$name" && read -r _done  # the host answers once it has taken its snapshot
    echo "@@ SCENARIO $name $outcome $(awk "BEGIN { print $ended - $started }") s"
done
sync
poweroff -f
