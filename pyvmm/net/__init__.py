"""The host side of guest networking: TAP devices and their addresses."""

from __future__ import annotations

import re

_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


def parse_mac(text: str) -> bytes:
    """XX:XX:XX:XX:XX:XX as six bytes; ValueError (saying why) unless it can be a NIC's own."""
    if not _MAC.fullmatch(text):
        raise ValueError("not a MAC address (six hex bytes, XX:XX:XX:XX:XX:XX)")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ValueError("a multicast address cannot be a NIC's MAC")
    if not any(mac):
        raise ValueError("the all-zero address cannot be a NIC's MAC")
    return mac
