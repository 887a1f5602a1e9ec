"""Architectures: what each adds to a VM (`pyvmm.arch.interface.Arch`) and its implementations
(`x86_64/`; arm64 later)."""
