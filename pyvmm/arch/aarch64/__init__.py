"""The arm64 machine: memory layout, the Image loader, the device tree, the vGIC, ECAM."""
