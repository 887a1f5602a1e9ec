"""KVM objects: the system (`Kvm`), a virtual machine (`Vm`) and its vCPUs (`Vcpu`)."""

from pyvmm.kvm.errors import KvmError, KvmUnavailableError, MissingCapabilityError
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    Vcpu,
    VcpuExit,
)
from pyvmm.kvm.vm import Vm

__all__ = [
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "IoExit",
    "Kvm",
    "KvmError",
    "KvmUnavailableError",
    "MissingCapabilityError",
    "MmioExit",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
    "Vcpu",
    "VcpuExit",
    "Vm",
]
