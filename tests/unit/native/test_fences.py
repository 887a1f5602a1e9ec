"""The memory fences: the compiled helper loads and its three fences run."""

from __future__ import annotations

from pyvmm.native import fences


def test_the_three_fences_run() -> None:
    assert fences.acquire() is None
    assert fences.release() is None
    assert fences.full() is None


def test_they_are_the_compiled_helpers_functions() -> None:
    for fence, name in [
        (fences.acquire, "acquire"),
        (fences.release, "release"),
        (fences.full, "full"),
    ]:
        assert fence is getattr(fences._lib, f"pyvmm_fence_{name}")
