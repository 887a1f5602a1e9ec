"""Crafted kernel images through `pyvmm run`: whatever their headers claim, pyvmm's work and
memory stay bounded by what the file and the guest really hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import needs_kvm, run_pyvmm_measured
from tests.unit.loader.images import PN_XNUM, MiB, Seg, make_elf

GiB = 1 << 30
# mov al, 0xfe; out 0x64, al (reset through the i8042); hlt; jmp to the hlt
RESET = bytes.fromhex("b0fee664f4ebfd")
# Generous: pyvmm itself, its imports and the kernel's page tables, not the guest's RAM.
RSS_LIMIT = 200 * MiB


@needs_kvm
@pytest.mark.parametrize(
    ("mem_mib", "segments"),
    [
        (2048, [Seg(0x100000, RESET, memsz=1900 * MiB)]),
        (1 << 20, [Seg(0x100000, RESET), Seg(4 * GiB, b"x", memsz=900 * GiB)]),
    ],
    ids=["1.9 GiB BSS", "900 GiB BSS"],
)
def test_a_huge_bss_costs_no_host_memory(tmp_path: Path, mem_mib: int, segments: list[Seg]) -> None:
    """The BSS was zeroed through a host buffer of its size: 3.9 GB of RSS for 1.9 GiB, a
    MemoryError traceback for 900 GiB."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf(segments))
    r, peak = run_pyvmm_measured("run", "-m", str(mem_mib), str(kernel), rss_file=tmp_path / "rss")
    assert (r.returncode, r.stderr) == (0, "")
    assert peak < RSS_LIMIT, f"peak RSS {peak // MiB} MiB"


@pytest.mark.parametrize(
    ("phentsize", "count", "message"),
    [
        (0, 0xFFFF_FFFF, "e_phentsize 0; a 64-bit program header is 56 bytes"),
        (56, 0xFFFF_FFFF, "the program header table (4294967295 entries at e_phoff 0x40)"),
    ],
)
def test_a_program_header_count_the_file_does_not_hold(
    tmp_path: Path, phentsize: int, count: int, message: str
) -> None:
    """e_phnum = PN_XNUM sends the loader to section 0's sh_info for the count: four billion
    headers of size 0 had pyvmm re-parse one header for ever, growing without bound."""
    kernel = tmp_path / "vmlinux"
    segments = [Seg(0x100000, RESET), Seg(0x200000, RESET)]
    kernel.write_bytes(make_elf(segments, phnum=PN_XNUM, phentsize=phentsize, section0_info=count))
    r, peak = run_pyvmm_measured("run", str(kernel), rss_file=tmp_path / "rss", timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr
    assert peak < RSS_LIMIT
