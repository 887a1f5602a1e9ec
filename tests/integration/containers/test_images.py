"""The images, built (or reused: they are keyed on their Dockerfile, docker/versions and what they
copy in) through the harness, and runs in them: the probe guest in the runtime image with exit
statuses passed through, and `bin/build_test --container --quick` in the test image."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.harness import containers as c
from pyvmm.harness.linux import LinuxHarness, choose_placement
from tests.integration.conftest import ROOT, kvm_usable, save_serial_log

GUEST_DIR = "/guest"


def _engine_problem() -> str | None:
    try:
        c.select_engine()
    except c.ContainerError as e:
        return str(e)
    return None


pytestmark = [
    pytest.mark.skipif(_engine_problem() is not None, reason=str(_engine_problem())),
    pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable())),
]


@pytest.fixture(scope="module")
def engine() -> Iterator[c.Engine]:
    with c.Engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def runtime_image(engine: c.Engine) -> str:
    engine.build(c.RUNTIME_IMAGE, platform.machine())
    return c.RUNTIME_TAG


@pytest.fixture(scope="module")
def test_image(engine: c.Engine) -> str:
    engine.build(c.TEST_IMAGE, platform.machine())
    return c.TEST_TAG


def run_pyvmm(engine: c.Engine, image: str, probe: Path, *args: str) -> c.RunResult:
    return engine.run(image, list(args), mounts={str(probe.parent): GUEST_DIR}, timeout=300)


def test_runtime_image_boots_the_probe_guest(
    engine: c.Engine, runtime_image: str, probe_elf: Path
) -> None:
    run = run_pyvmm(
        engine,
        runtime_image,
        probe_elf,
        "run",
        "-c",
        "2",
        "-p",
        "probe=serial,cmos,e820,cpus",
        "-p",
        "probe.cpus=2",
        f"{GUEST_DIR}/{probe_elf.name}",
    )
    save_serial_log("container-probe", run.output)
    assert run.status == 0, run.output
    for test in ("serial", "cmos", "e820", "cpus"):
        assert f"PROBE {test} ok" in run.output, run.output
    assert "PROBE done 4 passed, 0 failed" in run.output


def test_runtime_image_passes_a_failure_through(
    engine: c.Engine, runtime_image: str, probe_elf: Path
) -> None:
    run = run_pyvmm(engine, runtime_image, probe_elf, "run", f"{GUEST_DIR}/no-such-vmlinux")
    assert run.status == 1, run.output
    assert "no-such-vmlinux" in run.output
    assert len(run.output.strip().splitlines()) == 1, run.output  # pyvmm's one-line error


def test_runtime_image_passes_a_usage_error_through(
    engine: c.Engine, runtime_image: str, probe_elf: Path
) -> None:
    run = run_pyvmm(engine, runtime_image, probe_elf, "run", "--cpus", "nonsense", "x")
    assert run.status == 2, run.output


def test_runtime_image_has_no_compiler_and_no_test_tools(
    engine: c.Engine, runtime_image: str
) -> None:
    script = "for t in gcc cc make pytest pip; do command -v $t && exit 1; done; exit 0"
    run = engine.run(runtime_image, ["-c", script], devices=(), entrypoint=["sh"])
    assert run.status == 0, f"found in the runtime image: {run.output}"


def test_an_absent_device_is_a_clear_error(engine: c.Engine, runtime_image: str) -> None:
    with pytest.raises(c.DeviceRefusedError, match="/dev/no-such-device"):
        engine.run(runtime_image, ["--help"], devices=("/dev/no-such-device",), timeout=60)


def test_build_test_quick_in_the_test_image(test_image: str) -> None:
    results = "build/test-results/container-quick"
    proc = subprocess.run(
        ["bin/build_test", "--container", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYVMM_TEST_RESULTS": results},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "image        ok" in proc.stdout
    for suite in ("lint", "type", "unit"):
        assert any(
            line.startswith(f"{suite} ") and " ok " in line for line in proc.stdout.splitlines()
        ), proc.stdout[-3000:]
    assert (ROOT / results / "unit.xml").exists()
    assert (ROOT / results / "summary.json").exists()


@pytest.mark.skipif(
    not choose_placement().native,
    reason="this host's KVM cannot boot a stock kernel; tests/integration/linux boots it in the "
    "test VM instead",
)
def test_runtime_image_boots_the_debian_kernel(engine: c.Engine, runtime_image: str) -> None:
    files = LinuxHarness().guest_files()
    mounts = {str(files.bzimage.parent): "/kernel", str(files.initramfs.parent): "/initramfs"}
    argv = ["run", "-c", "2", "-p", "quiet", "-p", "pyvmm.check=uptime,cpus,dmesg"]
    argv += ["-p", "pyvmm.cpus=2", "-i", f"/initramfs/{files.initramfs.name}"]
    argv += [f"/kernel/{files.bzimage.name}"]
    run = engine.run(runtime_image, argv, mounts=mounts, timeout=300)
    save_serial_log("container-debian-kernel", run.output)
    assert run.status == 0, run.output
    for check in ("uptime", "cpus", "dmesg"):
        assert f"GUEST {check} ok" in run.output, run.output
