"""Ask the C compiler about the system headers, to check our cffi declarations against them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def c_facts(
    tmp_path: Path, headers: list[str], exprs: list[str], include_dirs: Sequence[str] = ()
) -> list[int]:
    """Compile a program printing each C expression (as unsigned long) and run it; headers are
    looked for in `include_dirs` first (another architecture's kernel headers, say)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = "".join(f"#include <{h}>\n" for h in headers)
    src += "#include <stdio.h>\n#include <stddef.h>\nint main(void) {\n"
    src += "".join(f'    printf("%lu\\n", (unsigned long)({e}));\n' for e in exprs)
    src += "    return 0;\n}\n"
    c = tmp_path / "facts.c"
    c.write_text(src)
    exe = tmp_path / "facts"
    flags = [f"-I{d}" for d in include_dirs]
    subprocess.run(["gcc", *flags, "-o", str(exe), str(c)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def layout_facts(ffi: Any, structs: list[str]) -> list[tuple[str, int]]:
    """(C expression, cffi's value) for the size of each struct and the offset and size of each
    field, members of nested structs included (`a.b`), named as the header names them."""
    facts: list[tuple[str, int]] = []

    def add_fields(name: str, ctype: Any, prefix: str) -> None:
        for field, info in ctype.fields:
            path = f"{prefix}{field}"
            offset = ffi.offsetof(f"struct {name}", *path.split("."))
            facts.append((f"offsetof(struct {name}, {path})", offset))
            if info.type.kind == "array" and info.type.length is None:
                continue  # a flexible array has no size
            facts.append((f"sizeof(((struct {name} *)0)->{path})", ffi.sizeof(info.type)))
            if info.type.kind == "struct":
                add_fields(name, info.type, f"{path}.")

    for name in structs:
        facts.append((f"sizeof(struct {name})", ffi.sizeof(f"struct {name}")))
        add_fields(name, ffi.typeof(f"struct {name}"), "")
    return facts


def mismatches(
    tmp_path: Path,
    headers: list[str],
    facts: list[tuple[str, int]],
    include_dirs: Sequence[str] = (),
) -> list[str]:
    """Each fact whose value differs from what the C compiler makes of its expression."""
    actual = c_facts(tmp_path, headers, [expr for expr, _ in facts], include_dirs)
    return [
        f"{expr}: pyvmm {mine}, header {theirs}"
        for (expr, mine), theirs in zip(facts, actual, strict=True)
        if mine != theirs
    ]
