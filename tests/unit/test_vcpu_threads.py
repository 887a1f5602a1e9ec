"""The generic vCPU loop ends the VM on the exits that mean the guest is done."""

from __future__ import annotations

import pytest

from pyvmm.devices.bus import Bus
from pyvmm.kvm import InterruptedExit, ShutdownExit, SystemEventExit, VcpuExit
from pyvmm.vcpu_threads import (
    SYSTEM_EVENT_CRASH,
    SYSTEM_EVENT_RESET,
    SYSTEM_EVENT_SHUTDOWN,
    VcpuThreads,
    VmExit,
)


class ScriptedVcpu:
    """A vCPU whose KVM_RUN returns the given exits in turn."""

    id = 0

    def __init__(self, exits: list[VcpuExit]) -> None:
        self.exits = exits

    def run(self) -> VcpuExit:
        return self.exits.pop(0)

    def request_exit(self) -> None:
        pass


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (SYSTEM_EVENT_SHUTDOWN, VmExit(0, "guest shut down")),  # PSCI SYSTEM_OFF
        (SYSTEM_EVENT_RESET, VmExit(0, "guest reset")),  # PSCI SYSTEM_RESET
        (SYSTEM_EVENT_CRASH, VmExit(1, "vCPU 0: guest crashed")),
    ],
)
def test_a_system_event_ends_the_vm(event: int, expected: VmExit) -> None:
    vcpu = ScriptedVcpu([InterruptedExit(), SystemEventExit(event)])
    exits: list[VmExit] = []

    def on_exit(exit: VmExit) -> None:
        exits.append(exit)
        threads.request_stop()

    threads = VcpuThreads([vcpu], Bus("io"), Bus("mmio"), None, on_exit)  # type: ignore[list-item]
    threads.run_vcpu(vcpu)  # type: ignore[arg-type]
    assert exits == [expected]
    assert vcpu.exits == []


def test_a_triple_fault_resets_and_logs_where_the_vcpu_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vcpu = ScriptedVcpu([ShutdownExit()])
    exits: list[VmExit] = []

    def on_exit(exit: VmExit) -> None:
        exits.append(exit)
        threads.request_stop()

    threads = VcpuThreads(
        [vcpu],  # type: ignore[list-item]
        Bus("io"),
        Bus("mmio"),
        None,
        on_exit,
        describe=lambda v: f"rip=0xffffffff81000000 of vCPU {v.id}",
    )
    threads.run_vcpu(vcpu)  # type: ignore[arg-type]
    assert exits == [VmExit(0, "guest reset (triple fault)")]
    assert "vCPU 0: rip=0xffffffff81000000 of vCPU 0" in caplog.text
