"""pyvmm's compiled helpers: where each lives, building it, and opening it with cffi.

A helper is a small C file beside this module (`<name>.c`) that gcc compiles into a shared
object, opened with cffi's ABI mode (`ffi.dlopen`): no Python headers, no C library, and one
build serves every Python that runs the tree. `python -m pyvmm.native` (bin/bootstrap.sh and
the image build run it, before `python -m pyvmm.cdecl`) builds every helper for this machine.

The shared object is named for the machine it was built for (`_<name>-<machine>.so`, the
machine as `uname -m` gives it), so a tree shared with a machine of another architecture (the
arm64 test VM mounts this one over 9p) never opens the other's. Beside it, `_<name>-<machine>.src`
keeps a copy of the source it was built from: a helper whose source changed since is rebuilt by
the build and refused by `Helper.open`. There is no fallback: a helper that is missing or out of
date is a one-line `HelperError` that says how to build it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NATIVE_DIR = Path(__file__).resolve().parent
HELPERS = ("fences", "virtq")
BUILD_COMMAND = "python -m pyvmm.native"
DEFAULT_CC = "gcc"
# -nostdlib: the helpers call nothing, so the object needs no libc (nor libc6-dev to link it)
# and a cross compiler alone can build it for another machine.
CFLAGS = ("-O2", "-fPIC", "-shared", "-nostdlib", "-Wall", "-Wextra")
COMPILER_OUTPUT_LINES = 20


class HelperError(Exception):
    """A helper cannot be built or opened; the message says why and what to run."""


def this_machine() -> str:
    """The machine helpers are built for and opened on (platform.machine(), without importing
    platform)."""
    return os.uname().machine


@dataclass(frozen=True)
class Helper:
    """One compiled helper: its source `<source_dir>/<name>.c` and, per machine, the shared
    object and source copy in `build_dir`."""

    name: str
    source_dir: Path = NATIVE_DIR
    build_dir: Path = NATIVE_DIR

    @property
    def source(self) -> Path:
        return self.source_dir / f"{self.name}.c"

    def library(self, machine: str) -> Path:
        return self.build_dir / f"_{self.name}-{machine}.so"

    def built_from(self, machine: str) -> Path:
        """The copy of the source the library was built from."""
        return self.build_dir / f"_{self.name}-{machine}.src"

    def unusable(self, machine: str) -> str | None:
        """Why the library for `machine` cannot be used as it is (None when it can)."""
        library = self.library(machine)
        try:
            source = self.source.read_text()
        except OSError:
            return f"its source {self.source} is missing"
        if not library.exists():
            return f"{library} is missing"
        try:
            built_from = self.built_from(machine).read_text()
        except OSError:
            return f"{self.built_from(machine)} is missing"
        if built_from != source:
            return f"{library} was built from an older {self.source.name}"
        return None

    def build(self, machine: str | None = None, cc: str | None = None) -> bool:
        """Compile the library for `machine` (default: this one) unless it is current; True
        when it was compiled. Another machine needs its cross compiler as `cc`."""
        import subprocess

        machine = machine or this_machine()
        if cc is None:
            if machine != this_machine():
                raise HelperError(
                    f"building {self.name} for {machine} on {this_machine()} needs a cross "
                    f"compiler: --cc {machine}-linux-gnu-gcc"
                )
            cc = DEFAULT_CC
        if self.unusable(machine) is None:
            return False
        try:
            source = self.source.read_text()
        except OSError as e:
            raise HelperError(f"cannot read {self.source}: {e.strerror}") from e
        library = self.library(machine)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        tmp_library = library.with_name(f".{library.name}.{os.getpid()}.tmp")
        tmp_copy = self.built_from(machine).with_name(f".{library.name}.src.{os.getpid()}.tmp")
        # gcc compiles exactly the text that is kept as the copy (read once, from stdin); the
        # #line directive keeps its messages pointing at the real file.
        cmd = [cc, *CFLAGS, "-x", "c", "-o", str(tmp_library), "-"]
        try:
            try:
                proc = subprocess.run(
                    cmd,
                    input=f'#line 1 "{self.source}"\n{source}',
                    capture_output=True,
                    text=True,
                    check=False,
                )
            except FileNotFoundError as e:
                raise HelperError(f"{cc} not found: install gcc (apt-get install gcc)") from e
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).strip().splitlines()
                shown = "\n".join(f"    {line}" for line in output[-COMPILER_OUTPUT_LINES:])
                raise HelperError(
                    f"{cc} could not build {self.source} (status {proc.returncode}):\n{shown}"
                )
            tmp_copy.write_text(source)
            os.replace(tmp_library, library)  # a new file: a process that has the old one open
            os.replace(tmp_copy, self.built_from(machine))  # keeps its mapping intact
        finally:
            tmp_library.unlink(missing_ok=True)
            tmp_copy.unlink(missing_ok=True)
        return True

    def open(self, ffi: Any, machine: str | None = None) -> Any:
        """The library for this machine opened with `ffi` (which declares its functions)."""
        machine = machine or this_machine()
        why = self.unusable(machine)
        if why is None:
            try:
                return ffi.dlopen(str(self.library(machine)))
            except OSError as e:
                why = f"{self.library(machine)} does not load ({e})"
        raise HelperError(
            f"pyvmm's compiled {self.name} helper for {machine} cannot be used: {why}; "
            f"build it with `{BUILD_COMMAND}` (needs gcc)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=BUILD_COMMAND, description="Build pyvmm's compiled helpers (when out of date)."
    )
    parser.add_argument(
        "--machine", default=this_machine(), help="build for this machine (uname -m)"
    )
    parser.add_argument(
        "--cc", help=f"the C compiler (default {DEFAULT_CC}; another machine's cross compiler)"
    )
    args = parser.parse_args(argv)
    try:
        for name in HELPERS:
            helper = Helper(name)
            if helper.build(args.machine, args.cc):
                print(f"native: built {helper.library(args.machine)}", file=sys.stderr)
    except HelperError as e:
        print(f"native: {e}", file=sys.stderr)
        return 1
    return 0
