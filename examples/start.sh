#!/bin/sh
# Entry point of the enclave image. A shell wrapper, not python3 directly: enclaves whose
# entry point exec'd python3 have been seen to exit at once.
#
# qproxy's enclave half brings the loopback interface up itself (an enclave starts with it
# down), then listens; it is restarted if it ever exits. The service starts once lo is up.
# `python3 -m qproxy` rather than `python3 /root/qproxy.py`: CPython keeps a script's syntax
# tree in memory for as long as it runs, about 2.6 MB for qproxy.py; a module's it frees.
set -u

(
    cd /root || exit 1
    while true; do
        python3 -m qproxy enclave --config /root/config_qproxy.toml
        echo "start.sh: qproxy enclave exited with $?; restarting in 1 s" >&2
        sleep 1
    done
) &

# Wait (at most 10 s) for qproxy to raise lo: bit 0 of its flags is IFF_UP.
tries=0
while [ $(( $(cat /sys/class/net/lo/flags) & 1 )) -eq 0 ] && [ "$tries" -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done

exec /root/app.sh
