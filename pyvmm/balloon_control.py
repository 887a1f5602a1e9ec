"""The VMM's side of the balloon: the size it should hold, set by the user (`pyvmm balloon`) and
by the low-memory policy (pyvmm.balloon_policy, on a thread of its own), and the guest's memory
statistics on request.

Both set absolute sizes, never increments. The device is told the larger of the two: the user's
size is a floor the policy never takes the balloon below, and while the host is low on memory
the policy's steps hold even if the user asks for less.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Protocol

from pyvmm.balloon_policy import LowMemoryPolicy, run_policy
from pyvmm.memory import PAGE_SIZE

log = logging.getLogger(__name__)

# How long `stats` waits for the driver to refresh its statistics, and how often it looks.
STATS_TIMEOUT_S = 3.0
STATS_POLL_S = 0.02
POLICY_STOP_S = 2.0


class BalloonDevice(Protocol):
    """The balloon's PCI function, in this process or in a device process of its own."""

    def command(self, request: dict[str, Any]) -> dict[str, Any]: ...


class BalloonControl:
    def __init__(self, device: BalloonDevice, guest_bytes: int, memfd: int) -> None:
        self._device = device
        self._guest_bytes = guest_bytes
        self._memfd = memfd  # the guest's RAM: what it holds on the host is its st_blocks
        self._lock = threading.Lock()
        self._user_bytes = 0
        self._policy_bytes = 0
        self._stop = threading.Event()
        self._policy_thread: threading.Thread | None = None

    def set_target(self, num_bytes: int) -> None:
        """`pyvmm balloon BYTES`: the balloon should hold `num_bytes` (rounded down to pages)."""
        if num_bytes > self._guest_bytes:
            raise ValueError(
                f"balloon {num_bytes}: more than the guest's {self._guest_bytes >> 20} MiB "
                "of memory"
            )
        with self._lock:
            self._user_bytes = num_bytes
            self._tell_device()

    def set_policy_target(self, num_bytes: int) -> None:
        with self._lock:
            self._policy_bytes = num_bytes
            self._tell_device()

    def _tell_device(self) -> None:
        pages = max(self._user_bytes, self._policy_bytes) // PAGE_SIZE
        self._device.command({"op": "set_target", "pages": pages})

    def stats(self, fresh: bool = True) -> dict[str, Any]:
        """The guest's latest statistics (asked for anew unless not `fresh`, and fresh when the
        driver answers within STATS_TIMEOUT_S), the balloon's sizes, and what the guest's RAM
        holds on the host. Without `fresh` it answers at once: for a program that watches the
        balloon's size, which the driver's answers would only slow."""
        status = self._device.command({"op": "request_stats" if fresh else "status"})
        asked = status["stats_replies"]
        got_fresh = False
        deadline = time.monotonic() + STATS_TIMEOUT_S
        while fresh and status["driver"] and time.monotonic() < deadline:
            time.sleep(STATS_POLL_S)
            status = self._device.command({"op": "status"})
            if status["stats_replies"] > asked:
                got_fresh = True
                break
        with self._lock:
            user, policy = self._user_bytes, self._policy_bytes
        return {
            "target": status["target_pages"] * PAGE_SIZE,
            "actual": status["actual_pages"] * PAGE_SIZE,
            "requested": user,
            "policy": policy,
            "stats": status["stats"],
            "stats_fresh": got_fresh,
            "guest_memory_on_host": os.fstat(self._memfd).st_blocks * 512,
        }

    def start_policy(self, policy: LowMemoryPolicy) -> None:
        """Run the low-memory policy until `close`."""
        self._policy_thread = threading.Thread(
            target=self._run_policy, args=(policy,), name="balloon policy", daemon=True
        )
        self._policy_thread.start()

    def _run_policy(self, policy: LowMemoryPolicy) -> None:
        try:
            run_policy(policy, self.set_policy_target, self._stop)
        except Exception as exc:  # the VM goes on with the balloon where it is
            log.warning("the balloon's low-memory policy stopped: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._policy_thread is not None:
            self._policy_thread.join(POLICY_STOP_S)
