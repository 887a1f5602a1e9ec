#!/usr/bin/env bash
# Kokoro job for aarch64 runners (kokoro/aarch64/continuous.cfg): see kokoro/build.sh.
# Not useful yet: pyvmm boots guests only on x86_64 hosts (its arm64 support, FDT, GIC and PSCI
# behind pyvmm/arch/interface.py's Arch, is still to come), so on an arm64 runner the suite
# fails at its first VM with "pyvmm does not run on aarch64 hosts yet". The job is kept so that
# the arm64 port lands with its CI already wired.
exec "$(dirname "${BASH_SOURCE[0]}")/../build.sh" aarch64
