#!/usr/bin/env bash
# Kokoro job for aarch64 runners (kokoro/aarch64/continuous.cfg): see kokoro/build.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/../build.sh" aarch64
