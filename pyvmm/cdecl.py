"""C declarations for cffi, parsed once when pyvmm is installed rather than at every start.

Every module that declares C structs or functions does it with `declare(name, source)`. Parsing
a declaration (cffi runs pycparser) costs more than the rest of pyvmm's start-up together: ~50
ms on a fast host, seconds under emulation. `python -m pyvmm.cdecl` (run by bin/bootstrap.sh
and the image build) writes each declaration as a cffi out-of-line ABI module,
`pyvmm/_cdecl_<name>.py`, that loads without a parser. `declare` uses that module only when it
was made from exactly the source it is given (the module keeps a copy to compare); otherwise it
parses the source itself, so an edited declaration is never shadowed by a stale build.

Hot paths read declared structs without cffi objects: `struct_for` turns fields of a declaration
into a `struct.Struct`, `field_index` and `int_format` give where a field is in a memoryview of
native integers, all from the declaration rather than hand-written offsets.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import struct
import sys
from pathlib import Path
from typing import Any, Literal

PACKAGE_DIR = Path(__file__).resolve().parent
MODULE_PREFIX = "_cdecl_"

# name -> (source, packed) of every declare() made so far, for the build.
_declared: dict[str, tuple[str, bool]] = {}
# The modules whose declarations the build writes (importing one runs its declare()).
DECLARING_MODULES = [
    "pyvmm.kvm.abi",
    "pyvmm.kvm.x86_64",
    "pyvmm.kvm.aarch64",
    "pyvmm.loader.bootparams",
    "pyvmm.arch.x86_64.mptable",
    "pyvmm.arch.aarch64.image",
    "pyvmm.disk.raw",
    "pyvmm.devices.pci.msix",
    "pyvmm.devices.virtio.queue",
    "pyvmm.devices.virtio.block",
    "pyvmm.devices.virtio.net",
    "pyvmm.devices.virtio.balloon",
    "pyvmm.net.tap",
    "pyvmm.vhost",
    "pyvmm.vsock.packet",
    "pyvmm.devices.virtio.pci",
    "pyvmm.native.fences",
    "pyvmm.native.virtq",
    "pyvmm.sandbox.seccomp",
    "pyvmm.sandbox.jail",
]


def prebuilt(name: str, source: str, packed: bool = False) -> Any | None:
    """The prebuilt FFI for this exact declaration, or None."""
    try:
        module = importlib.import_module(f"pyvmm.{MODULE_PREFIX}{name}")
    except ImportError:
        return None
    # A comparison, not a hash: hashlib would import OpenSSL, a cost this module exists to avoid.
    if getattr(module, "SOURCE", None) != source or getattr(module, "PACKED", None) != packed:
        return None
    return module.ffi


def parse(source: str, packed: bool = False) -> Any:
    """An FFI with `source` parsed now."""
    import cffi  # only here: importing cffi's parser is itself a good part of the cost

    ffi = cffi.FFI()
    ffi.cdef(source, packed=packed)
    return ffi


def declare(name: str, source: str, packed: bool = False) -> Any:
    """An FFI with `source` declared: prebuilt when current, else parsed."""
    _declared[name] = (source, packed)
    return prebuilt(name, source, packed) or parse(source, packed)


IntFormat = Literal["B", "H", "I", "Q"]
_INT_FORMATS: dict[int, IntFormat] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def field_type(ffi: Any, ctype: str, field: str) -> Any:
    """The cffi type of `field` of `ctype`; a dotted `field` names a member of a member."""
    current = ffi.typeof(ctype)
    for name in field.split("."):
        current = dict(current.fields)[name].type
    return current


def int_format(ffi: Any, ctype: Any) -> IntFormat:
    """The `struct` (and memoryview) format of an unsigned integer C type, or of the items of an
    array of them."""
    if isinstance(ctype, str):
        ctype = ffi.typeof(ctype)
    if ctype.kind == "array":
        ctype = ctype.item
    if ctype.kind != "primitive":
        raise ValueError(f"{ctype.cname} is not an integer type")
    return _INT_FORMATS[ffi.sizeof(ctype)]


def field_index(ffi: Any, ctype: str, field: str) -> int:
    """Where `field` of `ctype` is in the struct seen as an array of the field's own integer
    type (of its items, for an array field): the index into `memoryview.cast(int_format(...))`."""
    item = field_type(ffi, ctype, field)
    if item.kind == "array":
        item = item.item
    offset: int = ffi.offsetof(ctype, *field.split("."))
    size: int = ffi.sizeof(item)
    index, rest = divmod(offset, size)
    if rest:
        raise ValueError(f"{ctype}.{field} is not aligned to its own size")
    return index


def struct_for(ffi: Any, ctype: str, *fields: str) -> struct.Struct:
    """A `struct.Struct` that unpacks the given unsigned integer fields (and byte arrays, as
    bytes) of `ctype` in one call, starting at the first field's offset. Offsets and sizes come
    from the cffi declaration, so hot paths can decode structs from a buffer without
    hand-written offsets."""
    first = ffi.offsetof(ctype, *fields[0].split("."))
    fmt = "<"
    pos = first
    for f in fields:
        offset = ffi.offsetof(ctype, *f.split("."))
        if offset < pos:
            raise ValueError(f"{ctype}: field {f} is out of order")
        ftype = field_type(ffi, ctype, f)
        size = ffi.sizeof(ftype)
        is_bytes = ftype.kind == "array" and ftype.item.cname == "uint8_t"
        fmt += "x" * (offset - pos) + (f"{size}s" if is_bytes else _INT_FORMATS[size])
        pos = offset + size
    return struct.Struct(fmt)


def build(directory: Path = PACKAGE_DIR) -> list[Path]:
    """Write the out-of-line module of every declaration; the paths written."""
    import cffi

    for module in DECLARING_MODULES:
        importlib.import_module(module)
    # The registry the modules filled (under `python -m`, this module is a second copy).
    declared: dict[str, tuple[str, bool]] = importlib.import_module("pyvmm.cdecl")._declared
    written = []
    for name, (source, packed) in sorted(declared.items()):
        target = directory / f"{MODULE_PREFIX}{name}.py"
        builder = cffi.FFI()
        builder.cdef(source, packed=packed)
        builder.set_source(f"{MODULE_PREFIX}{name}", None)
        generated = target.with_suffix(".tmp")
        with contextlib.redirect_stdout(io.StringIO()):  # cffi says "generating ..."
            builder.emit_python_code(str(generated))
        text = generated.read_text()
        generated.unlink()
        header = f"# Generated by python -m pyvmm.cdecl from pyvmm's `{name}` declaration.\n"
        footer = f"PACKED = {packed!r}\nSOURCE = {source!r}\n"
        if not target.exists() or target.read_text() != header + text + footer:
            target.write_text(header + text + footer)
        written.append(target)
    return written


def main() -> int:
    for path in build():
        print(f"cdecl: {path.relative_to(PACKAGE_DIR.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
