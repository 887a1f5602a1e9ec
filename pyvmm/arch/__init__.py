"""Architectures: what each adds to a VM (`pyvmm.arch.interface.Arch`) and its implementations
(`x86_64/` and `aarch64/`), picked by the host in `host.py`."""
