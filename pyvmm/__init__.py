"""pyvmm: a KVM virtual machine monitor in Python, modelled on crosvm."""

__version__ = "0.1.0"
