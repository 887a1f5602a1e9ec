"""GsiRouter against the real KVM (an x86 VM with its PIC/IOAPIC routes): MSI routes beside the
irqchip pins, and every table it writes is one KVM accepts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvmm.kvm import Kvm, Vm
from pyvmm.kvm import x86_64 as kvm_x86
from pyvmm.kvm.routing import GsiRouter, RoutingError

KVM_PATH = "/dev/kvm"


def _kvm_unusable() -> str | None:
    if not os.path.exists(KVM_PATH):
        return f"{KVM_PATH} is absent on this host"
    if not os.access(KVM_PATH, os.R_OK | os.W_OK):
        return f"{KVM_PATH} is not accessible to uid {os.getuid()}"
    return None


pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(_kvm_unusable() is not None, reason=str(_kvm_unusable())),
]


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    v = Vm(kvm)
    kvm_x86.configure_vm(v)
    yield v
    v.close()


def _router(vm: Vm) -> GsiRouter:
    return GsiRouter(vm.fd, kvm_x86.irqchip_routes())


def _next(router: GsiRouter) -> int:
    """The next GSI after those routed, as the allocator would hand it out."""
    global _gsi
    _gsi += 1
    return router.add_msi(_gsi)


_gsi = 23


@pytest.fixture(autouse=True)
def _fresh_gsis() -> None:
    global _gsi
    _gsi = 23


def test_an_ioapic_pin_or_a_gsi_routed_twice_is_refused(vm: Vm) -> None:
    router = _router(vm)
    assert router.add_msi(24) == 24
    with pytest.raises(RoutingError, match="GSI 24 is already routed"):
        router.add_msi(24)
    with pytest.raises(RoutingError, match="GSI 23 is already routed"):
        router.add_msi(23)


def test_set_msi_commits_and_can_be_repeated(vm: Vm) -> None:
    router = _router(vm)
    gsi = _next(router)
    router.set_msi(gsi, 0xFEE0_0000, 0x4021)
    router.set_msi(gsi, 0xFEE0_0000, 0x4021)
    router.set_msi(gsi, 0x1_FEE0_1000, 0x4022)  # a 64-bit address with a high half
    other = _next(router)
    router.set_msi(other, 0xFEE0_2000, 0x30)
    assert other == gsi + 1


def test_an_msi_gsi_takes_an_irqfd(vm: Vm) -> None:
    router = _router(vm)
    gsi = _next(router)
    router.set_msi(gsi, 0xFEE0_0000, 0x4021)
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.register_irqfd(fd, gsi)
        router.set_msi(gsi, 0xFEE0_1000, 0x4022)  # re-routing keeps the irqfd
        os.eventfd_write(fd, 1)
        # KVM took the interrupt: its irqfd consumed the count as it injected the MSI.
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
        vm.unregister_irqfd(fd, gsi)
        os.eventfd_write(fd, 1)  # no longer KVM's: the count stays for whoever reads it
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


def test_two_hundred_vectors(vm: Vm) -> None:
    router = _router(vm)
    gsis = [_next(router) for _ in range(200)]
    for n, gsi in enumerate(gsis):
        router.set_msi(gsi, 0xFEE0_0000 | (n % 4) << 12, 0x4000 | (0x30 + n % 200))


def test_unknown_gsi_is_refused(vm: Vm) -> None:
    router = _router(vm)
    with pytest.raises(KeyError):
        router.set_msi(24, 0xFEE0_0000, 0x4021)


def test_running_out_of_gsis_is_a_routing_error_and_harmless(vm: Vm) -> None:
    router = _router(vm)  # slow: each allocation rewrites the whole table (~7 s in all)
    gsis: list[int] = []
    with pytest.raises(RoutingError):
        for _ in range(5000):
            gsis.append(_next(router))
    router.set_msi(gsis[0], 0xFEE0_0000, 0x4021)
