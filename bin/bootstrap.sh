# Sourced by bin/demo and bin/build_test: make sure the system packages and the project's
# virtualenv (.venv) exist. Installs with apt when root; otherwise says what to install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# Debian packages the build needs: gcc/make/binutils build the probe guest, the kernel
# headers check our cffi declarations, python3-venv makes .venv. The device sandbox loads
# libseccomp and libcap; their -dev packages hold the headers its declarations are checked
# against. pylibfdt (arm64 device trees) builds from source against python3-dev; dtc checks the
# trees pyvmm writes and arm64's kernel headers check its arm64 KVM declarations, on any host.
APT_PACKAGES=(gcc make binutils libc6-dev linux-libc-dev libseccomp2 libcap2 libseccomp-dev libcap-dev
    python3-dev device-tree-compiler linux-libc-dev-arm64-cross)
# What the Linux guest kit and the test VM need: kmod (depmod) and e2fsprogs for the kit,
# QEMU for the test VM on hosts whose KVM cannot boot a stock kernel.
LINUX_APT_PACKAGES=(kmod e2fsprogs qemu-system-x86)
# What the arm64 suite needs on another host (bin/build_test): the arm64 test VM's QEMU,
# mmdebstrap with qemu-user-static (binfmt) and arch-test to make its arm64 root, and the cross
# compiler for the guest kit's static helpers and pyvmm's compiled helpers (the test VM has no
# gcc).
ARM64_APT_PACKAGES=(qemu-system-arm qemu-user-static binfmt-support mmdebstrap arch-test
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
# What the container suites and docker/build need: podman (with runc) when no Docker engine
# answers, debootstrap for the local Debian base image (ARM64_APT_PACKAGES make arm64's on
# another host). Not needed inside the test image.
CONTAINER_APT_PACKAGES=(podman runc debootstrap)

missing_apt_packages() {
    local pkg missing=()
    for pkg in "${APT_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    echo "${missing[@]:-}"
}

ensure_apt_packages() {
    local missing
    missing="$(missing_apt_packages "$@")"
    [ -z "$missing" ] && return 0
    if ! command -v dpkg-query >/dev/null; then
        echo "bootstrap: not a Debian/Ubuntu system; install the equivalents of: $missing" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: missing Debian packages; run: sudo apt-get install -y $missing" >&2
        exit 1
    fi
    echo "bootstrap: installing $missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# ensure_arm64_binfmt: arm64 programs run on this host through qemu-user-static (mmdebstrap
# runs the arm64 root's maintainer scripts). Installing the package registers it only where a
# service manager mounted binfmt_misc; on a fresh machine or in a container, root does it here.
# Without root, the arm64 suite says what is missing and skips itself.
ensure_arm64_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    [ "$(uname -m)" = aarch64 ] && return 0
    [ -e "$dir/qemu-aarch64" ] && grep -qx enabled "$dir/qemu-aarch64" && return 0
    [ "$(id -u)" -eq 0 ] && command -v update-binfmts >/dev/null || return 0
    [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || return 0
    echo "bootstrap: registering qemu-aarch64 with binfmt_misc" >&2
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
}

find_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null &&
            "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    echo "bootstrap: pyvmm needs Python >= 3.11 with venv (apt-get install python3 python3-venv)" >&2
    exit 1
}

# ensure_venv EXTRAS: create .venv and install pyvmm (editable) with the given extras,
# again only when pyproject.toml changed since the last install.
ensure_venv() {
    local extras="${1:-}" spec="$ROOT" stamp
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    stamp="$VENV/.pyvmm-installed-${extras:-base}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$(find_python)" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "bootstrap: installing Python dependencies into .venv" >&2
        # compat: the editable install is a plain path entry, not an import hook that every
        # Python start-up runs (30 ms of each pyvmm command's start-up here).
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            --config-settings editable_mode=compat -e "$spec" >&2
        touch "$stamp"
    fi
    # The compiled helpers for this machine (pyvmm/native/helpers.py), first: the declarations'
    # modules open them. Rebuilt only when a source changed; says so, and shows gcc's errors.
    "$VENV/bin/python" -m pyvmm.native
    # The C declarations, prebuilt so that start-up does not parse them (pyvmm/cdecl.py);
    # rewritten only when a declaration changed.
    "$VENV/bin/python" -m pyvmm.cdecl 2>/dev/null
}
