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
