"""The cffi boot-protocol declarations match <asm/bootparam.h>."""

from __future__ import annotations

from pathlib import Path

from pyvmm.loader.bootparams import ffi
from tests.cheaders import c_facts


def test_boot_params_layout_matches_linux_headers(tmp_path: Path) -> None:
    exprs: list[str] = []
    expected: list[tuple[str, int]] = []
    for name in ("setup_header", "boot_e820_entry", "boot_params"):
        ctype = ffi.typeof(f"struct {name}")
        exprs.append(f"sizeof(struct {name})")
        expected.append((f"sizeof({name})", ffi.sizeof(ctype)))
        for field, info in ctype.fields:
            if field.startswith("_pad"):
                continue
            exprs.append(f"offsetof(struct {name}, {field})")
            expected.append((f"{name}.{field}", info.offset))
    actual = c_facts(tmp_path, ["asm/bootparam.h"], exprs)
    mismatches = [
        f"{what}: cffi {mine}, header {theirs}"
        for (what, mine), theirs in zip(expected, actual, strict=True)
        if mine != theirs
    ]
    assert not mismatches
