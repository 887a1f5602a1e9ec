"""Compiled helpers: built for this machine, rebuilt when their source changes, refused when
missing, out of date or built for another machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cffi
import pytest

from pyvmm.native import helpers
from pyvmm.native.helpers import BUILD_COMMAND, NATIVE_DIR, Helper, HelperError, this_machine

FENCES_CDEF = """
void pyvmm_fence_acquire(void);
void pyvmm_fence_release(void);
void pyvmm_fence_full(void);
"""
# ELF e_machine values (elf.h), to check what a library was built for.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
E_MACHINE_OFFSET = 18


def _ffi(cdef: str = FENCES_CDEF) -> Any:
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


def _e_machine(path: Path) -> int:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[E_MACHINE_OFFSET : E_MACHINE_OFFSET + 2], "little")


@pytest.fixture
def helper(tmp_path: Path) -> Helper:
    """The fences helper with its source copied into a directory of its own."""
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    shutil.copy(NATIVE_DIR / "fences.c", source_dir / "fences.c")
    return Helper("fences", source_dir, tmp_path / "build")


def test_build_makes_a_library_for_this_machine(helper: Helper) -> None:
    machine = this_machine()
    assert helper.build() is True
    library = helper.library(machine)
    assert library.name == f"_fences-{machine}.so"
    assert helper.built_from(machine).read_text() == helper.source.read_text()
    if machine in ELF_MACHINES:
        assert _e_machine(library) == ELF_MACHINES[machine]
    lib = helper.open(_ffi())
    assert lib.pyvmm_fence_acquire() is None
    assert lib.pyvmm_fence_release() is None
    assert lib.pyvmm_fence_full() is None
    assert not list(helper.build_dir.glob(".*"))  # no temporary files left


def test_a_current_library_is_not_rebuilt(helper: Helper) -> None:
    helper.build()
    before = helper.library(this_machine()).stat()
    assert helper.build() is False
    after = helper.library(this_machine()).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_changed_source_is_refused_then_rebuilt(helper: Helper) -> None:
    helper.build()
    helper.source.write_text(
        helper.source.read_text() + "\nint pyvmm_fence_test_probe(void) { return 7; }\n"
    )
    why = helper.unusable(this_machine())
    assert why is not None and "older fences.c" in why
    with pytest.raises(HelperError, match=r"older fences\.c"):
        helper.open(_ffi())
    assert helper.build() is True
    lib = helper.open(_ffi(FENCES_CDEF + "int pyvmm_fence_test_probe(void);"))
    assert lib.pyvmm_fence_test_probe() == 7


def test_a_library_built_for_another_machine_is_not_opened(helper: Helper) -> None:
    # Simulated: the host's compiler, filed under another machine's key.
    assert helper.build("othermachine", cc="gcc") is True
    assert helper.library("othermachine").exists()
    with pytest.raises(HelperError, match=f"for {this_machine()} cannot be used: .* is missing"):
        helper.open(_ffi())
    # This machine's build is a file of its own; the other one stays as it was.
    other = helper.library("othermachine").stat()
    assert helper.build() is True
    assert helper.library(this_machine()).exists()
    assert helper.library("othermachine").stat().st_mtime_ns == other.st_mtime_ns


def test_a_foreign_object_under_this_machines_name_is_refused(helper: Helper) -> None:
    helper.build()
    library = helper.library(this_machine())
    data = bytearray(library.read_bytes())
    foreign = 183 if _e_machine(library) != 183 else 62  # aarch64, or x86-64 on aarch64
    data[E_MACHINE_OFFSET : E_MACHINE_OFFSET + 2] = foreign.to_bytes(2, "little")
    library.write_bytes(bytes(data))
    with pytest.raises(HelperError, match="does not load"):
        helper.open(_ffi())


def test_another_machine_needs_a_cross_compiler(helper: Helper) -> None:
    with pytest.raises(HelperError, match="needs a cross compiler: --cc othermachine-linux-gnu"):
        helper.build("othermachine")


def test_a_missing_library_is_one_line_naming_the_build_command(helper: Helper) -> None:
    with pytest.raises(HelperError) as e:
        helper.open(_ffi())
    message = str(e.value)
    assert "\n" not in message
    assert f"_fences-{this_machine()}.so is missing" in message
    assert BUILD_COMMAND in message


def test_a_missing_source_is_said(tmp_path: Path) -> None:
    helper = Helper("nosuchhelper", tmp_path, tmp_path)
    with pytest.raises(HelperError, match=r"its source .*nosuchhelper\.c is missing"):
        helper.open(_ffi())
    with pytest.raises(HelperError, match="cannot read"):
        helper.build()


def test_compiler_errors_point_at_the_source_file(helper: Helper) -> None:
    helper.source.write_text("void broken(void) { this is not C; }\n")
    with pytest.raises(HelperError, match=r"could not build") as e:
        helper.build()
    assert f"{helper.source}:1" in str(e.value)
    assert not helper.library(this_machine()).exists()
    assert not list(helper.build_dir.glob(".*"))


def test_a_missing_compiler_is_said(helper: Helper) -> None:
    with pytest.raises(HelperError, match="no-such-cc not found"):
        helper.build(cc="no-such-cc")


def test_the_build_command_leaves_the_trees_helpers_current() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm.native"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name in helpers.HELPERS:
        assert Helper(name).unusable(this_machine()) is None


def test_the_build_command_reports_failures(capsys: pytest.CaptureFixture[str]) -> None:
    assert helpers.main(["--machine", "othermachine"]) == 1
    assert "native: " in capsys.readouterr().err
