"""Disk image backends for virtio-blk (raw now; the format is found from the header)."""
