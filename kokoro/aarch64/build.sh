#!/usr/bin/env bash
# Kokoro job for aarch64 runners (kokoro/aarch64/continuous.cfg): see kokoro/build.sh. On an
# arm64 KVM host the Linux suite boots Debian's arm64 kernel natively where that KVM can (as on
# x86_64), and the arm64 images are built natively; the same images build on x86_64 under
# qemu-user-static (`docker/build --arch aarch64`).
exec "$(dirname "${BASH_SOURCE[0]}")/../build.sh" aarch64
