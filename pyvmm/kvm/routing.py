"""The VM's GSI routing table: the legacy PIC/IOAPIC pins plus one MSI route per MSI-X vector.

KVM_SET_GSI_ROUTING replaces the whole table, so this object keeps it and writes all of it
whenever an MSI route changes. irqfds name GSIs, so a vector's irqfd stays registered while the
guest reprograms the vector's address and data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from pyvmm.kvm.abi import (
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    Ioctl,
    ffi,
)
from pyvmm.kvm.ioctl import ioctl

ISA_IRQS = 16
PIC_IRQS = 8
# KVM's limit on routing table entries (KVM_MAX_IRQ_ROUTES on x86).
MAX_ROUTES = 4096
# What KVM routes by default, which we keep: ISA IRQs to both PICs and the IOAPIC, the rest
# of the IOAPIC's pins alone.
LEGACY_ROUTES = ISA_IRQS * 2 + (KVM_IOAPIC_NUM_PINS - ISA_IRQS)


class RoutingError(Exception):
    """No route left for another interrupt, or a GSI routed twice."""


@dataclass
class MsiRoute:
    address: int = 0
    data: int = 0


class GsiRouter:
    """Owns KVM_SET_GSI_ROUTING for one VM."""

    def __init__(self, vm_fd: int) -> None:
        self._vm_fd = vm_fd
        self._msi: dict[int, MsiRoute] = {}
        self._lock = threading.Lock()

    def add_msi(self, gsi: int) -> int:
        """Route `gsi` (from the allocator) as an MSI, nowhere useful until `set_msi`; `gsi`."""
        with self._lock:
            if LEGACY_ROUTES + len(self._msi) >= MAX_ROUTES:
                raise RoutingError(f"all {MAX_ROUTES} interrupt routes are in use")
            if gsi < KVM_IOAPIC_NUM_PINS or gsi in self._msi:
                raise RoutingError(f"GSI {gsi} is already routed")
            self._msi[gsi] = MsiRoute()
            try:
                self._commit()
            except BaseException:
                del self._msi[gsi]
                raise
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            route = self._msi[gsi]
            if (route.address, route.data) == (address, data):
                return
            route.address, route.data = address, data
            self._commit()

    def _commit(self) -> None:
        table: Any = ffi.new(
            "struct kvm_irq_routing *", {"entries": LEGACY_ROUTES + len(self._msi)}
        )
        n = 0

        def irqchip(gsi: int, chip: int, pin: int) -> None:
            nonlocal n
            e = table.entries[n]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
            n += 1

        for gsi in range(KVM_IOAPIC_NUM_PINS):
            if gsi < PIC_IRQS:
                irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi)
            elif gsi < ISA_IRQS:
                irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - PIC_IRQS)
            irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi)
        for gsi, route in sorted(self._msi.items()):
            e = table.entries[n]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo = route.address & 0xFFFFFFFF
            e.u.msi.address_hi = route.address >> 32
            e.u.msi.data = route.data
            n += 1
        table.nr = n
        ioctl(self._vm_fd, Ioctl.KVM_SET_GSI_ROUTING, table)
