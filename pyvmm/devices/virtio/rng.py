"""virtio-rng: entropy for the guest from the host's getrandom (virtio 1.2 section 5.4)."""

from __future__ import annotations

import os

from pyvmm.devices.virtio.device import DeviceType, VirtioDevice, available_chains
from pyvmm.devices.virtio.queue import SplitQueue

QUEUE_SIZE = 256
# getrandom returns at most this much per call without blocking on large requests.
MAX_REQUEST = 1 << 20


class Rng(VirtioDevice):
    device_type = DeviceType.RNG
    name = "rng"

    @property
    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE]

    @property
    def device_features(self) -> int:
        return 0

    def config_read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\x00" * len(data)

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        for chain in available_chains(queue, self.guest_log):
            written = 0
            for view in chain.writable:
                want = min(len(view), MAX_REQUEST - written)
                if want <= 0:
                    break
                view[:want] = os.getrandom(want)
                written += want
            queue.add_used(chain.head, written)
