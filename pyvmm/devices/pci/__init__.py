"""The PCI bus: configuration mechanism #1, per-device configuration spaces, BARs, MSI-X."""
