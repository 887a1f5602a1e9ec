"""Byte ranges across a chain's buffers: a header split over two descriptors, a payload that
starts inside the first one. The buffers are views of guest memory, written in place."""

from __future__ import annotations


def views_at(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """Bytes [offset, offset + length) of the concatenation of `views`, as views of them
    (fewer bytes if the views end first)."""
    out = []
    for view in views:
        if length <= 0:
            break
        if offset >= len(view):
            offset -= len(view)
            continue
        part = view[offset : offset + length]
        out.append(part)
        length -= len(part)
        offset = 0
    return out


def write_at(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the concatenation of `views` (as much as fits)."""
    at = 0
    for part in views_at(views, offset, len(data)):
        part[:] = data[at : at + len(part)]
        at += len(part)


def read_at(views: list[memoryview], offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the concatenation of `views` (fewer if they end)."""
    return b"".join(bytes(part) for part in views_at(views, offset, length))
