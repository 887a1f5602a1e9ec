"""The cffi declarations of the KVM ABI match the system's <linux/kvm.h>, field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyvmm import vcpu_threads
from pyvmm.kvm import abi
from pyvmm.kvm import x86_64 as kvm_x86
from pyvmm.kvm.abi import Cap, Ioctl, ffi, struct_for
from pyvmm.kvm.x86_64 import X86Ioctl
from tests.cheaders import c_facts

# (the FFI that declares them, the structs)
STRUCTS: list[tuple[Any, list[str]]] = [
    (
        ffi,
        [
            "kvm_irq_routing_irqchip",
            "kvm_irq_routing_msi",
            "kvm_irq_routing_entry",
            "kvm_irq_routing",
            "kvm_userspace_memory_region",
            "kvm_irq_level",
            "kvm_ioeventfd",
            "kvm_irqfd",
            "kvm_coalesced_mmio_zone",
            "kvm_coalesced_mmio",
            "kvm_coalesced_mmio_ring",
            "kvm_one_reg",
            "kvm_create_device",
            "kvm_device_attr",
            "kvm_run",
        ],
    ),
    (
        kvm_x86.ffi,
        [
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
            "kvm_pit_config",
        ],
    ),
]
# Members of kvm_run's anonymous union and what follows it.
KVM_RUN_EXTRA = ["io", "mmio", "hw", "fail_entry", "ex", "internal", "system_event"]


def test_struct_sizes_and_offsets_match_linux_headers(tmp_path: Path) -> None:
    exprs: list[str] = []
    expected: list[tuple[str, int]] = []
    for declared, names in STRUCTS:
        for name in names:
            ctype = declared.typeof(f"struct {name}")
            exprs.append(f"sizeof(struct {name})")
            expected.append((f"sizeof({name})", declared.sizeof(ctype)))
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


CONSTANTS = {
    "KVM_API_VERSION": abi.KVM_API_VERSION,
    "KVM_EXIT_IO_IN": abi.KVM_EXIT_IO_IN,
    "KVM_EXIT_IO_OUT": abi.KVM_EXIT_IO_OUT,
    "KVM_IOEVENTFD_FLAG_DATAMATCH": abi.KVM_IOEVENTFD_FLAG_DATAMATCH,
    "KVM_IOEVENTFD_FLAG_PIO": abi.KVM_IOEVENTFD_FLAG_PIO,
    "KVM_IOEVENTFD_FLAG_DEASSIGN": abi.KVM_IOEVENTFD_FLAG_DEASSIGN,
    "KVM_IRQFD_FLAG_DEASSIGN": abi.KVM_IRQFD_FLAG_DEASSIGN,
    "KVM_IRQFD_FLAG_RESAMPLE": abi.KVM_IRQFD_FLAG_RESAMPLE,
    "KVM_MEM_READONLY": abi.KVM_MEM_READONLY,
    "KVM_IRQ_ROUTING_IRQCHIP": abi.KVM_IRQ_ROUTING_IRQCHIP,
    "KVM_IRQ_ROUTING_MSI": abi.KVM_IRQ_ROUTING_MSI,
    "KVM_CREATE_DEVICE_TEST": abi.KVM_CREATE_DEVICE_TEST,
    "KVM_IRQCHIP_PIC_MASTER": kvm_x86.KVM_IRQCHIP_PIC_MASTER,
    "KVM_IRQCHIP_PIC_SLAVE": kvm_x86.KVM_IRQCHIP_PIC_SLAVE,
    "KVM_IRQCHIP_IOAPIC": kvm_x86.KVM_IRQCHIP_IOAPIC,
    "KVM_IOAPIC_NUM_PINS": kvm_x86.KVM_IOAPIC_NUM_PINS,
    "KVM_PIT_SPEAKER_DUMMY": kvm_x86.KVM_PIT_SPEAKER_DUMMY,
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX": kvm_x86.KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    "KVM_SYSTEM_EVENT_SHUTDOWN": vcpu_threads.SYSTEM_EVENT_SHUTDOWN,
    "KVM_SYSTEM_EVENT_RESET": vcpu_threads.SYSTEM_EVENT_RESET,
    "KVM_SYSTEM_EVENT_CRASH": vcpu_threads.SYSTEM_EVENT_CRASH,
}


def test_constants_match_linux_headers(tmp_path: Path) -> None:
    actual = c_facts(tmp_path, ["linux/kvm.h"], list(CONSTANTS))
    assert dict(zip(CONSTANTS, actual, strict=True)) == CONSTANTS


def test_ioctl_numbers_match_linux_headers(tmp_path: Path) -> None:
    ioctls = [*Ioctl, *X86Ioctl]
    actual = c_facts(tmp_path, ["linux/kvm.h"], [i.name for i in ioctls])
    mismatches = [
        f"{i.name}: pyvmm {i.value:#x}, header {n:#x}"
        for i, n in zip(ioctls, actual, strict=True)
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
