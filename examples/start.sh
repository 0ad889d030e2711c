#!/bin/sh
# Entry point of the enclave image. A shell wrapper, not python3 directly: enclaves whose
# entry point exec'd python3 have been seen to exit at once.
#
# qproxy's enclave half brings the loopback interface up itself (an enclave starts with it
# down), then listens; it is restarted if it exits, with a back-off (1 s, doubling up to
# 30 s, back to 1 s after a run of a minute or more). The service starts once lo is up.
# `python3 -m qproxy` rather than `python3 /root/qproxy.py`: CPython keeps a script's syntax
# tree in memory for as long as it runs, about 2.6 MB for qproxy.py; a module's it frees.
# POSIX sh only: /bin/sh is dash on Debian images.
set -u

(
    cd /root || exit 1
    delay=1
    while true; do
        started=$(date +%s)
        python3 -m qproxy enclave --config /root/config_qproxy.toml
        status=$?
        if [ "$status" -eq 2 ]; then
            # Exit 2 is a configuration or usage error. The configuration is part of the
            # measured image, so no restart can fix it: only a new image can. An enclave
            # whose proxy is gone is unreachable and cannot reach out, yet looks alive, so
            # stop it all instead: $$ is this script's process, by then the app (exec below);
            # the enclave ends with its entry point, and the reason is the line above this
            # one on the console. (If lo never came up, the app has not started: the wait
            # below is cut short the same way.)
            echo "start.sh: qproxy enclave exited with 2 (a configuration or usage error; a restart cannot fix it): stopping" >&2
            kill -TERM $$ 2>/dev/null
            exit 2
        fi
        # Exit 1 (cannot start), 3 (internal error), 0 or a signal: try again, less often
        # each time in a row, so that a half that keeps failing does not spin.
        if [ $(( $(date +%s) - started )) -ge 60 ]; then
            delay=1
        fi
        echo "start.sh: qproxy enclave exited with $status; restarting in $delay s" >&2
        sleep "$delay"
        delay=$(( delay * 2 ))
        if [ "$delay" -gt 30 ]; then
            delay=30
        fi
    done
) &

# Wait (at most 10 s) for qproxy to raise lo: bit 0 of its flags is IFF_UP. Flags that
# cannot be read (no /sys, no lo) count as down: the app then starts after the 10 s.
lo_is_up() {
    flags=$(cat /sys/class/net/lo/flags 2>/dev/null) || return 1
    case $flags in
        0x*[!0-9a-fA-F]* | 0x) return 1 ;;
        0x*) [ $(( flags & 1 )) -ne 0 ] ;;
        *) return 1 ;;
    esac
}
tries=0
while ! lo_is_up && [ "$tries" -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done

exec /root/app.sh
