#!/bin/sh
# A domU's stage (run by /sbin/rig-init from its job disk at /job): load the
# Xen devices, bring up eth0 on xenbr0's network, run the command agent until
# dom0 says stop, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for m in xen-evtchn xen-gntdev xen-gntalloc xen-netfront; do
    modprobe "$m" || echo "rig-domu: modprobe $m failed"
done
ip link set lo up
domid=$(xenstore-read domid)
if ip link show eth0 >/dev/null 2>&1; then
    ip addr add "10.99.0.$((10 + domid))/24" dev eth0
    ip link set eth0 up
fi
mkdir -p /job/logs
export PYTHONPATH=/job/site PYTHONDONTWRITEBYTECODE=1 PATH="/job/site/bin:$PATH"
echo "rig-domu: domain $domid up at $(cut -d' ' -f1 /proc/uptime) s"
timeout -k 5 "$(cat /job/lifetime)" python3 /job/rig_agent.py
echo "rig-domu: agent ended with status $?"
sync
mount -o remount,ro /job
echo 1 >/proc/sys/kernel/sysrq
echo o >/proc/sysrq-trigger
sleep 30
