"""Prebuilt cffi declarations: used only when made from the same source, laid out as parsed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from pyvmm import cdecl


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layout(ffi: Any, source: str) -> dict[str, Any]:
    """Size and field offsets of every struct the source declares."""
    layout: dict[str, Any] = {}
    for word, name in zip(source.split(), source.split()[1:], strict=False):
        if word == "struct" and name.isidentifier():
            ctype = ffi.typeof(f"struct {name}")
            layout[name] = (ffi.sizeof(ctype), [(f, i.offset) for f, i in ctype.fields or []])
    return layout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return cdecl.build(tmp_path_factory.mktemp("cdecl"))


def test_every_declaration_is_built(built: list[Path]) -> None:
    names = {p.name for p in built}
    assert names == {f"{cdecl.MODULE_PREFIX}{n}.py" for n in cdecl._declared}
    assert {"_cdecl_kvm.py", "_cdecl_bootparams.py", "_cdecl_virtio_pci.py"} <= names
    assert {"_cdecl_virtio_ring.py", "_cdecl_pci_msix.py"} <= names


def test_a_built_declaration_lays_out_structs_as_a_parse_does(built: list[Path]) -> None:
    for path in built:
        name = path.stem.removeprefix(cdecl.MODULE_PREFIX)
        source, packed = cdecl._declared[name]
        module = _load(path)
        assert (source, packed) == (module.SOURCE, module.PACKED)
        assert _layout(module.ffi, source) == _layout(cdecl.parse(source, packed), source)


def test_a_stale_build_is_not_used() -> None:
    source, packed = cdecl._declared["kvm"]
    assert cdecl.prebuilt("kvm", source + "\nstruct added { int x; };", packed) is None
    assert cdecl.prebuilt("kvm", source, not packed) is None


def test_a_missing_build_falls_back_to_parsing() -> None:
    ffi = cdecl.declare("nonexistent_for_test", "struct pair { int a; int b; };")
    assert ffi.sizeof("struct pair") == 8
    del cdecl._declared["nonexistent_for_test"]


LAYOUT = """
struct elem { uint32_t id; uint32_t len; };
struct ring { uint16_t flags; uint16_t idx; struct elem first; uint16_t entries[]; };
"""


def test_field_type_follows_dotted_members() -> None:
    ffi = cdecl.parse(LAYOUT)
    assert cdecl.field_type(ffi, "struct ring", "first.len").cname == "uint32_t"
    assert cdecl.field_type(ffi, "struct ring", "entries").cname == "uint16_t[]"


def test_int_format_of_integers_and_their_arrays() -> None:
    ffi = cdecl.parse(LAYOUT)
    assert cdecl.int_format(ffi, "uint64_t") == "Q"
    assert cdecl.int_format(ffi, cdecl.field_type(ffi, "struct ring", "entries")) == "H"
    with pytest.raises(ValueError, match="not an integer"):
        cdecl.int_format(ffi, "struct elem")


def test_field_index_is_the_offset_in_units_of_the_field() -> None:
    ffi = cdecl.parse(LAYOUT)
    view = memoryview(bytearray(ffi.sizeof("struct ring") + 4))
    ring = ffi.cast("struct ring *", ffi.from_buffer(view))
    ring.idx, ring.first.len = 7, 9
    ring.entries[1] = 5
    u16, u32 = view.cast("H"), view.cast("I")
    assert u16[cdecl.field_index(ffi, "struct ring", "idx")] == 7
    assert u16[cdecl.field_index(ffi, "struct ring", "entries") + 1] == 5
    assert u32[cdecl.field_index(ffi, "struct ring", "first.len")] == 9
    packed = cdecl.parse("struct odd { uint8_t a; uint16_t b; };", packed=True)
    with pytest.raises(ValueError, match="not aligned"):
        cdecl.field_index(packed, "struct odd", "b")


def test_struct_for_skips_what_lies_between_fields() -> None:
    ffi = cdecl.parse(LAYOUT)
    assert cdecl.struct_for(ffi, "struct ring", "flags", "first.len").format == "<HxxxxxxI"
    with pytest.raises(ValueError, match="out of order"):
        cdecl.struct_for(ffi, "struct ring", "idx", "flags")
