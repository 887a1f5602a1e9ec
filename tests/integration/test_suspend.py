"""`suspend` means parked: while a VM is suspended, its guest's virtio I/O does not move at all
(neither the used ring nor the backing file), and after `resume` it goes on: with the device in
a process of its own (the default) and as a thread (--disable-sandbox).

The VMM runs in this process, so that the test can look at guest memory while it is suspended;
the guest says where its used ring is."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from pathlib import Path

import pytest

from pyvmm.config import DiskConfig, VmConfig
from pyvmm.vmm import VmExit, Vmm
from tests.integration.conftest import needs_kvm, wait_until

pytestmark = needs_kvm

MiB = 1 << 20
PARKED_FOR = 1.0  # how long the test watches a suspended VM for movement


class Console(io.RawIOBase):
    """The guest's serial output, kept for the test to wait on."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.changed = threading.Condition()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        with self.changed:
            self.text += data
            self.changed.notify_all()
        return len(data)

    def wait_for(self, needle: bytes, timeout: float) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: needle in self.text, timeout), (
                f"no {needle!r} on the console: {bytes(self.text[-300:])!r}"
            )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sandbox", [True, False], ids=["process", "thread"])
def test_a_suspended_vm_moves_no_virtio_io_until_resumed(
    probe_elf: Path, tmp_path: Path, sandbox: bool
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    config = VmConfig(
        kernel=str(probe_elf),
        params=("probe=blkbench", "probe.bench=seqw", f"probe.bytes={1 << 40}"),
        disks=(DiskConfig(str(image), writable=True),),
        sandbox=sandbox,
    ).validate()
    console = Console()
    vmm = Vmm(config, console_out=console)  # type: ignore[arg-type]
    seen: dict[str, object] = {}

    def drive() -> None:
        try:
            start_line = re.compile(rb"PROBE blkbench start used 0x([0-9a-f]+)\r?\n")
            wait_until(lambda: bool(start_line.search(console.text)), 30, "no start line")
            found = start_line.search(console.text)
            assert found is not None
            used_idx_addr = int(found.group(1), 16) + 2  # where the guest put the used ring
            start = vmm.mem.read_u16(used_idx_addr)
            wait_until(
                lambda: vmm.mem.read_u16(used_idx_addr) != start, 10, "no I/O before suspend"
            )
            vmm.pause()
            idx, digest = vmm.mem.read_u16(used_idx_addr), _digest(image)
            time.sleep(PARKED_FOR)
            seen["while suspended"] = (vmm.mem.read_u16(used_idx_addr), _digest(image))
            seen["at suspend"] = (idx, digest)
            vmm.resume()
            wait_until(lambda: vmm.mem.read_u16(used_idx_addr) != idx, 10, "no I/O after resume")
            seen["after resume"] = _digest(image) != digest or "file unchanged"
        except BaseException as e:  # reported by the main thread
            seen["error"] = e
        finally:
            vmm.request_exit(VmExit(0, "test done"))

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        result = vmm.run()
    finally:
        driver.join(60)
        vmm.close()
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    assert result == VmExit(0, "test done")
    assert seen["while suspended"] == seen["at suspend"], "I/O moved while suspended"
    assert seen["after resume"] is True
