"""Virtio devices: split virtqueues, the PCI transport, and the device models."""
