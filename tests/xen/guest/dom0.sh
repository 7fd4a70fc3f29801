#!/bin/sh
# dom0's stage (run by /sbin/rig-init from the 9p share at /rig): start Xen's
# daemons and the xenbr0 bridge, run /rig/job.sh under a deadline, collect the
# logs into /rig/out, write the job's status, power off (QEMU then exits).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
OUT=/rig/out
mkdir -p "$OUT"
exec >>"$OUT/dom0-stage.log" 2>&1
. /rig/boot/env
say() { echo "rig: $*"; echo "rig: $*" >/dev/hvc0; }
say "dom0 stage: $(date -u +%T) uptime $(cut -d' ' -f1 /proc/uptime) s"

for m in xen-evtchn xen-gntdev xen-gntalloc xen-blkback xen-netback loop bridge; do
    modprobe "$m" || say "modprobe $m failed"
done
ip link set lo up
# xenconsoled keeps every domU's console in /var/log/xen/console/guest-NAME.log
# (Debian's init script passes XENCONSOLED_ARGS).
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >>/etc/default/xen
mkdir -p /var/log/xen/console /var/lib/xen /var/run/xen
/etc/init.d/xen start || say "/etc/init.d/xen start failed"
# The drop-in index (docs/dropin.md): made by dom0 once per host, owned by dom0,
# readable and writable by every domain (drop-in servers list themselves in it).
xenstore-write /local/vchan-dropin "" && xenstore-chmod /local/vchan-dropin b0 \
    || say "cannot make the drop-in index /local/vchan-dropin"
# Xen's own virtual network for the benchmark: domUs' vifs join xenbr0.
ip link add xenbr0 type bridge
ip addr add 10.99.0.1/24 dev xenbr0
ip link set xenbr0 up
xl info >"$OUT/xl-info.txt" 2>&1
say "dom0 ready: uptime $(cut -d' ' -f1 /proc/uptime) s; job (at most ${RIG_JOB_TIMEOUT} s)"

export PYTHONPATH=/rig/site-vchan:/rig/site-test PYTHONDONTWRITEBYTECODE=1
export PATH="/rig/site-vchan/bin:/rig/site-test/bin:$PATH" RIG_OUT="$OUT" RIG_SHARE=/rig
timeout -k 10 "$RIG_JOB_TIMEOUT" sh /rig/job.sh
status=$?
say "job status $status at uptime $(cut -d' ' -f1 /proc/uptime) s"

# Whatever domUs are left, then the logs.
for d in $(xl list 2>/dev/null | awk 'NR>2 {print $1}'); do
    timeout 30 xl destroy "$d"
done
xl dmesg >"$OUT/xl-dmesg.txt" 2>&1
dmesg >"$OUT/dom0-dmesg.txt" 2>&1
cp -r /var/log/xen "$OUT/xen-logs" 2>/dev/null
echo "$status" >"$OUT/status"
sync
echo 1 >/proc/sys/kernel/sysrq
echo o >/proc/sysrq-trigger
sleep 30
