"""The cffi declarations of the KVM ABI match the system's <linux/kvm.h>, field by field."""

from __future__ import annotations

from pathlib import Path

from pyvmm.kvm.abi import Cap, Ioctl, ffi, struct_for
from tests.cheaders import c_facts

STRUCTS = [
    "kvm_regs",
    "kvm_segment",
    "kvm_dtable",
    "kvm_sregs",
    "kvm_fpu",
    "kvm_msr_entry",
    "kvm_msrs",
    "kvm_msr_list",
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_xcr",
    "kvm_xcrs",
    "kvm_lapic_state",
    "kvm_irq_routing_irqchip",
    "kvm_irq_routing_msi",
    "kvm_irq_routing_entry",
    "kvm_irq_routing",
    "kvm_userspace_memory_region",
    "kvm_pit_config",
    "kvm_irq_level",
    "kvm_ioeventfd",
    "kvm_irqfd",
    "kvm_coalesced_mmio_zone",
    "kvm_coalesced_mmio",
    "kvm_coalesced_mmio_ring",
    "kvm_run",
]
# Members of kvm_run's anonymous union and what follows it.
KVM_RUN_EXTRA = ["io", "mmio", "hw", "fail_entry", "ex", "internal", "system_event"]


def test_struct_sizes_and_offsets_match_linux_headers(tmp_path: Path) -> None:
    exprs: list[str] = []
    expected: list[tuple[str, int]] = []
    for name in STRUCTS:
        ctype = ffi.typeof(f"struct {name}")
        exprs.append(f"sizeof(struct {name})")
        expected.append((f"sizeof({name})", ffi.sizeof(ctype)))
        for field, info in ctype.fields:
            if not field:
                continue
            exprs.append(f"offsetof(struct {name}, {field})")
            expected.append((f"{name}.{field}", info.offset))
    for field in KVM_RUN_EXTRA:
        exprs.append(f"offsetof(struct kvm_run, {field})")
        expected.append((f"kvm_run.{field}", ffi.offsetof("struct kvm_run", field)))
    exprs.append("offsetof(struct kvm_run, mmio.data)")
    expected.append(("kvm_run.mmio.data", ffi.offsetof("struct kvm_run", "mmio", "data")))
    actual = c_facts(tmp_path, ["linux/kvm.h"], exprs)
    mismatches = [
        f"{what}: cffi {mine}, header {theirs}"
        for (what, mine), theirs in zip(expected, actual, strict=True)
        if mine != theirs
    ]
    assert not mismatches


def test_ioctl_numbers_match_linux_headers(tmp_path: Path) -> None:
    actual = c_facts(tmp_path, ["linux/kvm.h"], [i.name for i in Ioctl])
    mismatches = [
        f"{i.name}: pyvmm {i.value:#x}, header {n:#x}"
        for i, n in zip(Ioctl, actual, strict=True)
        if i.value != n
    ]
    assert not mismatches


def test_capability_numbers_match_linux_headers(tmp_path: Path) -> None:
    actual = c_facts(tmp_path, ["linux/kvm.h"], [c.name for c in Cap])
    assert {c.name: c.value for c in Cap} == dict(zip([c.name for c in Cap], actual, strict=True))


def test_struct_for_decodes_fields_where_cffi_puts_them() -> None:
    run = ffi.new("struct kvm_run *")
    run.io.direction, run.io.size, run.io.port = 1, 2, 0x3F8
    run.io.count, run.io.data_offset = 3, 0x1000
    io = struct_for(
        "struct kvm_run", "io.direction", "io.size", "io.port", "io.count", "io.data_offset"
    )
    offset = ffi.offsetof("struct kvm_run", "io", "direction")
    assert io.unpack_from(ffi.buffer(run), offset) == (1, 2, 0x3F8, 3, 0x1000)
    assert struct_for("struct kvm_irqfd", "fd", "flags").format == "<IxxxxI"


def test_struct_for_gives_byte_arrays_as_bytes() -> None:
    entry = ffi.new("struct kvm_coalesced_mmio *")
    entry.phys_addr, entry.len, entry.pio = 0xCF8, 4, 1
    ffi.memmove(entry.data, b"\x04\x08\x00\x80", 4)
    layout = struct_for("struct kvm_coalesced_mmio", "phys_addr", "len", "pio", "data")
    assert layout.unpack_from(ffi.buffer(entry)) == (0xCF8, 4, 1, b"\x04\x08\x00\x80" + bytes(4))
