"""Errors raised while loading a kernel, an initrd or the command line into guest memory.

Each message is one self-contained line (the CLI prints `str(exc)` as the reason): it names the
file, field or flag at fault, what was expected and what was found.
"""

from __future__ import annotations


class KernelLoadError(Exception):
    """The kernel image cannot be loaded."""


class KernelFileError(KernelLoadError):
    """The kernel file is missing, unreadable or not a regular file."""


class NotAKernelError(KernelLoadError):
    """The file is neither an ELF vmlinux nor a bzImage."""


class KernelTruncatedError(KernelLoadError):
    """The file ends before data its headers promise."""


class KernelTooLargeError(KernelLoadError):
    """The kernel needs more guest RAM than -m gives."""


class KernelOutsideRamError(KernelLoadError):
    """The kernel wants memory that is not RAM at any -m (the PCI hole, or below 1 MiB)."""


class ElfHeaderError(KernelLoadError):
    """The ELF or program headers cannot be parsed."""


class ElfClassError(KernelLoadError):
    """A 32-bit ELF: pyvmm boots 64-bit kernels only."""


class ElfByteOrderError(KernelLoadError):
    """A big-endian ELF."""


class ElfMachineError(KernelLoadError):
    """An ELF for another architecture."""


class ElfTypeError(KernelLoadError):
    """An ELF that is not an executable (a relocatable object, a core dump...)."""


class ElfNoLoadableSegmentError(KernelLoadError):
    """An ELF without PT_LOAD segments."""


class ElfSegmentSizeError(KernelLoadError):
    """A PT_LOAD segment with more file bytes than memory bytes."""


class ElfSegmentOverlapError(KernelLoadError):
    """Two PT_LOAD segments overlap in guest-physical memory."""


class ElfEntryError(KernelLoadError):
    """The ELF entry point is not inside any loaded segment."""


class BzImageHeaderError(KernelLoadError):
    """A bzImage setup header field has an impossible value."""


class BzImageProtocolError(KernelLoadError):
    """The bzImage boot protocol is too old, or the kernel has no 64-bit entry point."""


class InitrdError(Exception):
    """The initrd cannot be loaded."""


class InitrdFileError(InitrdError):
    """The initrd file is missing, unreadable or not a regular file."""


class InitrdEmptyError(InitrdError):
    """The initrd file is empty."""


class InitrdTooLargeError(InitrdError):
    """The initrd does not fit in low RAM beside the kernel."""


class InitrdTruncatedError(InitrdError):
    """The initrd file shrank while it was being read."""


class CmdlineError(Exception):
    """The kernel command line cannot be used."""


class CmdlineTooLongError(CmdlineError):
    """The command line is longer than the kernel accepts."""


class CmdlineCharacterError(CmdlineError):
    """The command line holds a NUL, a control character or a non-ASCII character."""
