"""The VM's GSI routing table: the architecture's irqchip pins plus one MSI route per MSI-X
vector.

KVM_SET_GSI_ROUTING replaces the whole table, so this object keeps it and writes all of it
whenever an MSI route changes. irqfds name GSIs, so a vector's irqfd stays registered while the
guest reprograms the vector's address and data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from pyvmm.kvm.abi import KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, Ioctl, ffi
from pyvmm.kvm.ioctl import ioctl

# KVM's limit on routing table entries (KVM_MAX_IRQ_ROUTES).
MAX_ROUTES = 4096


class RoutingError(Exception):
    """No route left for another interrupt, or a GSI routed twice."""


@dataclass
class MsiRoute:
    address: int = 0
    data: int = 0


class GsiRouter:
    """Owns KVM_SET_GSI_ROUTING for one VM."""

    def __init__(self, vm_fd: int, irqchip_routes: list[tuple[int, int, int]]) -> None:
        """`irqchip_routes`: the architecture's (GSI, irqchip, pin) routes, kept as they are."""
        self._vm_fd = vm_fd
        self._irqchip = list(irqchip_routes)
        self._pins = {gsi for gsi, _, _ in self._irqchip}
        self._msi: dict[int, MsiRoute] = {}
        self._lock = threading.Lock()

    def add_msi(self, gsi: int) -> int:
        """Route `gsi` (from the allocator) as an MSI, nowhere useful until `set_msi`; `gsi`."""
        with self._lock:
            if len(self._irqchip) + len(self._msi) >= MAX_ROUTES:
                raise RoutingError(f"all {MAX_ROUTES} interrupt routes are in use")
            if gsi in self._pins or gsi in self._msi:
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
            "struct kvm_irq_routing *", {"entries": len(self._irqchip) + len(self._msi)}
        )
        n = 0
        for gsi, chip, pin in self._irqchip:
            e = table.entries[n]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
            n += 1
        for gsi, route in sorted(self._msi.items()):
            e = table.entries[n]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo = route.address & 0xFFFFFFFF
            e.u.msi.address_hi = route.address >> 32
            e.u.msi.data = route.data
            n += 1
        table.nr = n
        ioctl(self._vm_fd, Ioctl.KVM_SET_GSI_ROUTING, table)
