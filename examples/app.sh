#!/bin/sh
# The vendor's test service: answers every connection to 127.0.0.1:5050 with "Hello world!".
# nc -N: Debian's netcat-openbsd (what the Dockerfile installs) otherwise keeps the
# connection open after the reply, and a client waiting for the end (curl) never returns.
PORT=5050
while true; do
    printf 'HTTP/1.1 200 OK\nContent-Type: text/plain\n\nHello world!\n' | nc -N -l 127.0.0.1 "$PORT"
done
