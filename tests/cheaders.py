"""Ask the C compiler about the system headers, to check our cffi declarations against them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def c_facts(tmp_path: Path, headers: list[str], exprs: list[str]) -> list[int]:
    """Compile a program printing each C expression (as unsigned long) and run it."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = "".join(f"#include <{h}>\n" for h in headers)
    src += "#include <stdio.h>\n#include <stddef.h>\nint main(void) {\n"
    src += "".join(f'    printf("%lu\\n", (unsigned long)({e}));\n' for e in exprs)
    src += "    return 0;\n}\n"
    c = tmp_path / "facts.c"
    c.write_text(src)
    exe = tmp_path / "facts"
    subprocess.run(["gcc", "-o", str(exe), str(c)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]
