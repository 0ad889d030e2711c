#!/bin/sh
# /init of the test VM (tests/vm/harness.py puts it into the initramfs).
# Loads the vsock loopback transport, runs each check named in /checks as a
# separate process under a timeout, reports on the serial console, powers off.
#
# The root filesystem is the enclave image (examples/build-rootfs.sh) with the
# harness beside it. The checks find their own standard library and libraries
# under /harness; the halves they start run as the image's entry point runs
# them (QPROXY_VM_HALF, under env -i: vmcheck.py), so neither reaches them.
export PATH=/bin:/usr/bin PYTHONUNBUFFERED=1 HOME=/root
export PYTHONPATH=/harness/stdlib:/harness/lib-dynload LD_LIBRARY_PATH=/harness/lib
QPROXY_VM_HALF=$(cat /harness/half)
export QPROXY_VM_HALF
python=${QPROXY_VM_HALF%% *}  # the checks run under the image's python3 too
CHECK_TIMEOUT=150  # seconds one check may take before it is killed

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for module in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
    insmod "/harness/modules/$module.ko" || echo "qproxy-vm: cannot load $module.ko"
done
ip link set lo up
echo "qproxy-vm: guest up: Linux $(uname -r), $("$python" -c 'import sys; print(sys.version.split()[0])')"

cd /qproxy
for name in $(cat /checks); do
    timeout -s KILL "$CHECK_TIMEOUT" "$python" "tests/vm/guest/check_$name.py"
    status=$?
    [ "$status" = 137 ] && echo "FAIL $name: killed after $CHECK_TIMEOUT s in the guest"
    echo "qproxy-vm: check $name exited with $status"
    # Whatever the check left running must not disturb the next one.
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [ "$pid" = 1 ] || kill -9 "$pid" 2>/dev/null
    done
done
echo "qproxy-vm: done"
poweroff -f
