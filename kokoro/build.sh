#!/usr/bin/env bash
# Kokoro entry point for a KVM-enabled runner: build the test image (cached by its key), run the
# whole suite inside it, and leave the JUnit XML, summary.json and the guests' serial logs under
# build/test-results for the job's artifacts. The exit status is the suite's.
#   kokoro/build.sh x86_64|aarch64
set -euo pipefail
arch="${1:?usage: kokoro/build.sh x86_64|aarch64}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(uname -m)" != "$arch" ]; then
    echo "kokoro: this job is for $arch runners; this one is $(uname -m)" >&2
    exit 1
fi
if [ ! -w /dev/kvm ]; then
    echo "kokoro: /dev/kvm is missing or not writable: this job needs a KVM-enabled runner" >&2
    exit 1
fi
export CI=true
docker/build --arch "$arch" test
status=0
bin/build_test --container || status=$?
# Keep the results beside the artifacts Kokoro collects, whatever the outcome.
if [ -n "${KOKORO_ARTIFACTS_DIR:-}" ] && [ -d build/test-results ]; then
    mkdir -p "$KOKORO_ARTIFACTS_DIR/test-results"
    cp -r build/test-results/. "$KOKORO_ARTIFACTS_DIR/test-results/"
fi
exit "$status"
