"""The KVM userspace ABI every architecture shares, declared once with cffi.

The kernel structs of `<linux/kvm.h>` that pyvmm passes to or reads from KVM on any
architecture are declared here exactly as in the header; ioctl numbers are derived from the
declarations with the kernel's own `_IOC` encoding (`ioc`). What only x86 has (`<asm/kvm.h>`:
registers, CPUID, MSRs, the PIT) is in `pyvmm.kvm.x86_64`. `tests/unit/kvm/test_abi.py`
compiles the same names against the system headers and checks every size, offset and number.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from pyvmm import cdecl
from pyvmm.cdecl import declare
from pyvmm.ioc import IOC_NONE, IOC_READ, IOC_WRITE
from pyvmm.ioc import ioc as generic_ioc

ffi: Any = declare(
    "kvm",
    """
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_irq_level {
        uint32_t irq;
        uint32_t level;
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t  fd;
        uint32_t flags;
        uint8_t  pad[36];
    };

    struct kvm_coalesced_mmio_zone {
        uint64_t addr;
        uint32_t size;
        union {
            uint32_t pad;
            uint32_t pio;
        };
    };

    struct kvm_coalesced_mmio {
        uint64_t phys_addr;
        uint32_t len;
        union {
            uint32_t pad;
            uint32_t pio;
        };
        uint8_t  data[8];
    };

    struct kvm_coalesced_mmio_ring {
        uint32_t first;
        uint32_t last;
        struct kvm_coalesced_mmio coalesced_mmio[];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t  pad[16];
    };

    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };

    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t pad;
    };

    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };

    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };

    struct kvm_one_reg {
        uint64_t id;
        uint64_t addr;
    };

    struct kvm_create_device {
        uint32_t type;
        uint32_t fd;
        uint32_t flags;
    };

    struct kvm_device_attr {
        uint32_t flags;
        uint32_t group;
        uint64_t attr;
        uint64_t addr;
    };

    struct kvm_run {
        uint8_t  request_interrupt_window;
        uint8_t  immediate_exit;
        uint8_t  padding1[6];
        uint32_t exit_reason;
        uint8_t  ready_for_interrupt_injection;
        uint8_t  if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct { uint64_t hardware_exit_reason; } hw;
            struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
            struct { uint32_t exception; uint32_t error_code; } ex;
            struct {
                uint8_t  direction;
                uint8_t  size;
                uint16_t port;
                uint32_t count;
                uint64_t data_offset;
            } io;
            struct {
                uint64_t phys_addr;
                uint8_t  data[8];
                uint32_t len;
                uint8_t  is_write;
            } mmio;
            struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
            struct {
                uint32_t type;
                uint32_t ndata;
                uint64_t data[16];
            } system_event;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        char s[2048];
    };

    int ioctl(int fd, unsigned long request, ...);
    """,
)

libc: Any = ffi.dlopen(None)


def struct_for(ctype: str, *fields: str) -> struct.Struct:
    """`pyvmm.cdecl.struct_for` for a KVM struct."""
    return cdecl.struct_for(ffi, ctype, *fields)


KVMIO = 0xAE


def ioc(direction: int, nr: int, size: int = 0) -> int:
    """A KVM ioctl request number (the kernel's _IOC(direction, KVMIO, nr, size))."""
    return generic_ioc(direction, KVMIO, nr, size)


def _io(nr: int) -> int:
    return ioc(IOC_NONE, nr)


def _iow(nr: int, ctype: str) -> int:
    return ioc(IOC_WRITE, nr, ffi.sizeof(ctype))


class Ioctl(enum.IntEnum):
    """ioctl request numbers every architecture has, named as in <linux/kvm.h>."""

    KVM_GET_API_VERSION = _io(0x00)
    KVM_CREATE_VM = _io(0x01)
    KVM_CHECK_EXTENSION = _io(0x03)
    KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
    KVM_CREATE_VCPU = _io(0x41)
    KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
    KVM_CREATE_IRQCHIP = _io(0x60)
    KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
    KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
    KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
    KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
    KVM_REGISTER_COALESCED_MMIO = _iow(0x67, "struct kvm_coalesced_mmio_zone")
    KVM_RUN = _io(0x80)
    KVM_GET_ONE_REG = _iow(0xAB, "struct kvm_one_reg")
    KVM_SET_ONE_REG = _iow(0xAC, "struct kvm_one_reg")
    KVM_CREATE_DEVICE = ioc(IOC_READ | IOC_WRITE, 0xE0, ffi.sizeof("struct kvm_create_device"))
    KVM_SET_DEVICE_ATTR = _iow(0xE1, "struct kvm_device_attr")
    KVM_GET_DEVICE_ATTR = _iow(0xE2, "struct kvm_device_attr")
    KVM_HAS_DEVICE_ATTR = _iow(0xE3, "struct kvm_device_attr")


class Cap(enum.IntEnum):
    """KVM_CHECK_EXTENSION capability numbers pyvmm asks about."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_IRQFD = 32
    KVM_CAP_IRQFD_RESAMPLE = 82
    KVM_CAP_PIT2 = 33
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_XCRS = 56
    KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_TSC_DEADLINE_TIMER = 72
    KVM_CAP_IMMEDIATE_EXIT = 136
    # Returns the page offset of the coalesced-write ring in a vCPU's mmap.
    KVM_CAP_COALESCED_MMIO = 15
    KVM_CAP_COALESCED_PIO = 162
    KVM_CAP_ONE_REG = 70
    KVM_CAP_DEVICE_CTRL = 89
    KVM_CAP_ARM_PSCI_0_2 = 102


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason values (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


KVM_API_VERSION = 12
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_MEM_READONLY = 1 << 1
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
# kvm_create_device.flags: only ask whether the device type exists.
KVM_CREATE_DEVICE_TEST = 1
