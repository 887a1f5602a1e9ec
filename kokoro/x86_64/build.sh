#!/usr/bin/env bash
# Kokoro job for x86_64 runners (kokoro/x86_64/continuous.cfg): see kokoro/build.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/../build.sh" x86_64
