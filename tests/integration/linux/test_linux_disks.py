"""A stock Debian kernel uses pyvmm's virtio disks, virtio-rng and control socket: an ext4 root
on a read-only disk (-r), data written to a writable disk (--rwdisk), fstrim on a writable disk,
entropy from /dev/hwrng, `pyvmm stop` ending a running VM (with --disable-sandbox: the devices
as threads), and, booted with `pci=nomsi`, three busy disks and the rng driven through shared
level-triggered INTx lines under sustained I/O.

The boots run in one go (natively or in one test VM boot) and each test judges one boot's report
and the files it left behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.harness.boots import BootResult, BootSpec
from pyvmm.harness.kit import make_ext4
from pyvmm.harness.linux import LinuxHarness, RootImage
from tests.integration.linux.conftest import completed, guest_check

MiB = 1 << 20
MEM_MIB = 1024
SEED = 0x5EED_0DD
COPY_MIB = 64  # copied by the guest from the source disk to the data disk
DATA_MIB = 80  # the data disk: the guest writes its first COPY_MIB MiB only
TRIM_MIB = 128
FILL_MIB = 48  # the one file on the trim disk, deleted by the guest before fstrim
MIN_TRIMMED = 32 * MiB
STOP_MARKER = "GUEST wait ready"
DISK_CHECKS = ["root", "disks", "rwdisk", "trim", "hwrng", "dmesg"]

# The INTx boot (pci=nomsi). pyvmm wires PCI device N (disks in command-line order, then the rng,
# then the balloon) to IO-APIC pin 16 + N % 8. With nine disks every busy device shares its pin
# with another busy one: vda and vdi share pin 16, vdb and the rng (device 9) pin 17; vdc-vdh are
# idle read-only fillers, the balloon (device 10, pin 18) an idle driver. (The MP table has room
# for 16 PCI interrupts: the rng cannot be device 16, on pin 16.)
INTX_DISKS = ("vda", "vdb", "vdi")  # each copies its first half to the next one's second half
INTX_FILLERS = 6
INTX_MIB = 6  # half a busy disk: the first seeded by the host, the second written by the guest
# The copies go in rounds of INTX_MIB / INTX_ROUNDS MiB: at each round's end every line falls
# quiet, where a lost last interrupt would leave its job waiting for ever.
INTX_ROUNDS = 6
# Two vCPUs: one takes an interrupt while the other submits the next request, as in any SMP guest
# (with one vCPU a device's own next completion can never race its interrupt's handler).
INTX_CPUS = 2
INTX_WAIT_S = 90  # the guest's bound on each I/O phase: a job still running then has stalled
INTX_CHECKS = ["intx", "intxio", "dmesg"]
INTX_DEVICES = [
    *(f"vd{chr(ord('a') + i)}" for i in range(len(INTX_DISKS) + INTX_FILLERS)),
    *("rng", "balloon"),
]
INTX_BUSY = (*INTX_DISKS, "rng")


@dataclass
class Disks:
    """The disk boot's files, as the host sees them after both boots."""

    root: RootImage
    source: bytes
    data: bytes  # data.img read back after the VM exited
    data_size: int
    trim: str  # the trim image's path where the boots ran
    socket: str


@dataclass
class IntxDisks:
    """The INTx boot's busy disks: what the host seeded and the images after the boots."""

    seeds: dict[str, bytes]  # disk -> its first INTX_MIB MiB, as the host wrote them
    images: dict[str, bytes]


@dataclass
class Boots:
    disks: BootResult
    stop: BootResult
    intx: BootResult
    files: Disks
    intx_files: IntxDisks


def _trim_image(directory: Path) -> Path:
    """An ext4 image holding one FILL_MIB MiB file, every block of it allocated on the host."""
    tree = directory / "trim-tree"
    tree.mkdir()
    (tree / "fill").write_bytes(b"\xa5" * (FILL_MIB * MiB))
    image = make_ext4(tree, directory / "trim.img", TRIM_MIB, label="pyvmm-trim")
    (tree / "fill").unlink()
    tree.rmdir()
    fd = os.open(image, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, TRIM_MIB * MiB)
    finally:
        os.close(fd)
    return image


@pytest.fixture(scope="module")
def boots() -> Iterator[Boots]:
    harness = LinuxHarness(progress=print)
    print(harness.placement.describe())
    files = harness.guest_files()
    root = harness.root_image()
    source = random.Random(SEED).randbytes(COPY_MIB * MiB)
    with harness.session() as dirs:
        src_img = dirs.local / "src.img"
        src_img.write_bytes(source)
        data_img = dirs.shared / "data.img"  # the host reads it back
        with open(data_img, "wb") as f:
            f.truncate(DATA_MIB * MiB)
        trim_img = _trim_image(dirs.local)  # hole punching needs a local filesystem
        socket = dirs.local / "ctl.sock"  # as does a Unix socket
        intx_seeds = {
            disk: random.Random(f"{SEED}-{disk}").randbytes(INTX_MIB * MiB) for disk in INTX_DISKS
        }
        intx_imgs = {disk: dirs.shared / f"intx-{disk}.img" for disk in INTX_DISKS}
        for disk, path in intx_imgs.items():
            with open(path, "wb") as f:
                f.write(intx_seeds[disk])
                f.truncate(2 * INTX_MIB * MiB)
        filler = dirs.local / "filler.img"  # read-only, so one image can be every filler
        with open(filler, "wb") as f:
            f.truncate(MiB)

        def pyvmm(*extra: str, cpus: int = 1) -> list[str]:
            common = ["-c", str(cpus), "-m", str(MEM_MIB), "-p", "quiet"]
            return harness.pyvmm_argv(*common, "-i", str(files.initramfs), *extra)

        specs = [
            BootSpec(
                "disks",
                pyvmm(
                    "-r",
                    str(root.path),
                    "--rwdisk",
                    str(data_img),
                    "-d",
                    str(src_img),
                    "--rwdisk",
                    str(trim_img),
                    "-p",
                    f"pyvmm.check={','.join(DISK_CHECKS)}",
                    "-p",
                    f"pyvmm.root_token={root.token}",
                    "-p",
                    f"pyvmm.data=vdb pyvmm.src=vdc pyvmm.mib={COPY_MIB} pyvmm.trim=vdd",
                    str(files.bzimage),
                ),
                watch=[str(trim_img)],
                timeout=300,  # ~90 s alone; a bound for a machine busy with another test VM
            ),
            BootSpec(
                "stop",
                # The thread mode's Linux run: the rng as a thread in the VMM process.
                pyvmm(
                    "--disable-sandbox",
                    *["-s", str(socket), "-p", "pyvmm.check=hwrng,wait", str(files.bzimage)],
                ),
                timeout=180,
                on_line={STOP_MARKER: harness.pyvmm_control_argv("stop", socket)},
                watch=[str(socket)],
            ),
            BootSpec(
                "intx",
                pyvmm(
                    "-p",
                    "pci=nomsi",
                    *["--rwdisk", str(intx_imgs["vda"]), "--rwdisk", str(intx_imgs["vdb"])],
                    *["-d", str(filler)] * INTX_FILLERS,
                    *["--rwdisk", str(intx_imgs["vdi"])],
                    "-p",
                    f"pyvmm.check={','.join(INTX_CHECKS)}",
                    "-p",
                    f"pyvmm.intx_disks={','.join(INTX_DISKS)} pyvmm.intx_mib={INTX_MIB} "
                    f"pyvmm.intx_rounds={INTX_ROUNDS} pyvmm.intx_wait={INTX_WAIT_S}",
                    str(files.bzimage),
                    cpus=INTX_CPUS,
                ),
                # Boot (eleven device processes starting: ~200 s to init in CI beside another
                # test VM), two I/O phases each bounded in the guest. A guest that stops is
                # caught sooner, by its beat.
                timeout=300 + 2 * INTX_WAIT_S,
            ),
        ]
        disks, stop, intx = harness.run(specs)
        data = data_img.read_bytes()
        yield Boots(
            disks,
            stop,
            intx,
            Disks(root, source, data, data_img.stat().st_size, str(trim_img), str(socket)),
            IntxDisks(intx_seeds, {disk: path.read_bytes() for disk, path in intx_imgs.items()}),
        )


def test_disk_boot_runs_every_check_and_resets(boots: Boots) -> None:
    result = boots.disks
    completed(result)
    for name in DISK_CHECKS:
        guest_check(result, name)
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


def test_ext4_root_disk_is_mounted_read_only(boots: Boots) -> None:
    details = guest_check(boots.disks, "root")
    # The init found its own marker on /, i.e. it switched from the initramfs to the disk.
    assert details.startswith(f"/dev/vda ext4 ro marker={boots.files.root.token},"), details
    assert details.endswith("write refused: Read-only file system"), details


def test_disks_are_named_in_command_line_order_with_their_sizes(boots: Boots) -> None:
    details = guest_check(boots.disks, "disks")
    root_bytes = boots.files.root.size_mib * MiB
    assert details.split() == [
        f"vda:{root_bytes}:ro:pyvmm-vda",
        f"vdb:{DATA_MIB * MiB}:rw:pyvmm-vdb",
        f"vdc:{COPY_MIB * MiB}:ro:pyvmm-vdc",
        f"vdd:{TRIM_MIB * MiB}:rw:pyvmm-vdd",
    ]


def test_guest_writes_to_rwdisk_reach_the_image(boots: Boots) -> None:
    details = guest_check(boots.disks, "rwdisk")
    want = hashlib.sha256(boots.files.source).hexdigest()
    assert details.split()[:2] == ["sha256", want], "the guest read back other data"
    data = boots.files.data
    assert boots.files.data_size == DATA_MIB * MiB, "the image changed size"
    assert hashlib.sha256(data[: COPY_MIB * MiB]).hexdigest() == want, (
        "data.img's first 64 MiB differ from what the guest copied"
    )
    assert data[COPY_MIB * MiB :].count(0) == (DATA_MIB - COPY_MIB) * MiB, (
        "bytes past what the guest wrote are not zero"
    )


def test_fstrim_gives_the_freed_blocks_back_to_the_host(boots: Boots) -> None:
    details = guest_check(boots.disks, "trim")
    m = re.search(r"(\d+) bytes\)? trimmed", details)  # busybox: "/mnt: N bytes trimmed"
    assert m, details
    assert int(m.group(1)) >= MIN_TRIMMED, details
    before, after = boots.disks.watched[boots.files.trim]
    assert before is not None and after is not None, "trim.img vanished"
    assert after.size == before.size == TRIM_MIB * MiB
    freed = before.allocated - after.allocated
    assert freed >= MIN_TRIMMED, (
        f"trim.img holds {after.allocated} bytes after fstrim, {before.allocated} before: "
        f"{freed} freed, expected at least {MIN_TRIMMED}"
    )


def test_hwrng_gives_entropy_from_virtio_rng(boots: Boots) -> None:
    assert guest_check(boots.disks, "hwrng").startswith("virtio_rng")


def test_kernel_log_is_clean_with_disks(boots: Boots) -> None:
    guest_check(boots.disks, "dmesg")


def test_pyvmm_stop_ends_the_vm_in_an_orderly_way(boots: Boots) -> None:
    result = boots.stop
    completed(result)
    assert STOP_MARKER in result.output, f"the guest never got ready:\n{result.output[-3000:]}"
    assert "GUEST done" not in result.output, "the guest ended by itself, not by pyvmm stop"
    guest_check(result, "hwrng")  # with --disable-sandbox: virtio-rng as a thread
    [stop] = result.commands
    assert stop.returncode == 0, f"pyvmm stop exited {stop.returncode}: {stop.output}"
    assert stop.output == "", "pyvmm stop is silent on success"
    during = stop.watched[boots.files.socket]
    assert during is not None and during.kind == "socket", "no control socket while running"
    before, after = result.watched[boots.files.socket]
    assert before is None
    assert after is None, "pyvmm left its control socket behind"


def _intx_pins(details: str) -> dict[str, int]:
    """device -> IO-APIC pin, from `GUEST intx ok vda@16 vdb@17 ...; shared 16=vda+vdi ...`."""
    devices, _, _ = details.partition(";")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+)@(\d+)", devices)}


def test_intx_boot_runs_every_check_and_resets(boots: Boots) -> None:
    result = boots.intx
    completed(result)
    for name in INTX_CHECKS:
        guest_check(result, name)
    assert "GUEST done" in result.output, f"init did not finish:\n{result.output[-3000:]}"


def _intx_copies() -> list[tuple[str, str]]:
    """(from, to) for each copy the guest makes: a busy disk's first half to the next's second."""
    return list(zip(INTX_DISKS, INTX_DISKS[1:] + INTX_DISKS[:1], strict=True))


def test_pci_nomsi_puts_the_virtio_devices_on_shared_intx_lines(boots: Boots) -> None:
    details = guest_check(boots.intx, "intx")  # the guest checked: no MSI, level-triggered IO-APIC
    pins = _intx_pins(details)
    assert sorted(pins) == sorted(INTX_DEVICES), details
    assert all(16 <= pin <= 23 for pin in pins.values()), f"not PCI's IO-APIC pins: {details}"
    for device in INTX_BUSY:
        mates = [d for d in INTX_BUSY if d != device and pins[d] == pins[device]]
        assert mates, f"{device} shares its INTx line with no other busy device: {details}"


def test_sustained_io_on_shared_intx_lines_completes_and_reaches_the_images(
    boots: Boots,
) -> None:
    details = guest_check(boots.intx, "intxio")  # FAIL says which I/O job stalled, and how
    seeds = boots.intx_files.seeds
    sums = dict(re.findall(r"(\w+>\w+):([0-9a-f]{32})", details))
    assert sums == {
        f"{source}>{target}": hashlib.md5(seeds[source]).hexdigest()
        for source, target in _intx_copies()
    }, f"the guest read back other data than the host seeded: {details}"
    half = INTX_MIB * MiB
    for source, target in _intx_copies():
        image = boots.intx_files.images[target]
        assert len(image) == 2 * half, f"{target}'s image changed size"
        assert image[:half] == seeds[target], f"{target}'s first {INTX_MIB} MiB changed"
        assert image[half:] == seeds[source], (
            f"{target}'s second {INTX_MIB} MiB on the host are not {source}'s first, copied"
        )


def test_the_shared_intx_lines_carried_the_interrupts(boots: Boots) -> None:
    pins = _intx_pins(guest_check(boots.intx, "intx"))
    details = guest_check(boots.intx, "intxio")
    taken = {int(pin): int(n) for pin, n in re.findall(r"(\d+) [\w+]+ \+(\d+)", details)}
    for device in INTX_BUSY:
        assert taken.get(pins[device], 0) > 0, (
            f"no interrupt on {device}'s IO-APIC pin {pins[device]} during the I/O: {details}"
        )
