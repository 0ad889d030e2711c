#!/bin/sh
# Run qproxy's checks over real AF_VSOCK in a Linux VM under QEMU (see README.md).
# Exit 0 when all passed; the last line is "N passed, M failed".
exec "${PYTHON:-python3}" "$(dirname "$0")/harness.py" "$@"
