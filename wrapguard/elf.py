"""Just enough ELF reading to tell whether the shim can see a program's socket calls.

LD_PRELOAD works only for dynamically linked programs that call libc: a static binary has no
ELF interpreter (PT_INTERP), and a Go binary makes its system calls itself (it carries a
`.go.buildinfo` section, or Go's build-info magic). Both bypass the shim. This module reads
headers only (ELF-64 and ELF-32, both byte orders) and never executes anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_INTERP = 3
_GO_MAGIC = b"\xff Go buildinf:"


@dataclass(frozen=True, slots=True)
class ElfInfo:
    interpreter: str | None
    is_go: bool

    @property
    def is_static(self) -> bool:
        return self.interpreter is None


class NotElf(ValueError):
    pass


def read_elf(path: str, *, scan_limit: int = 64 << 20) -> ElfInfo:
    """Read ELF facts from `path`; raises NotElf for other files and OSError if unreadable."""
    with open(path, "rb") as f:
        data = f.read(scan_limit)
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise NotElf(path)
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise NotElf(path)
    end = "<" if enc == 1 else ">"
    try:
        if cls == 2:
            phoff, shoff = struct.unpack_from(end + "QQ", data, 0x20)
            phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(
                end + "HHHHH", data, 0x36
            )
            ph_fmt, sh_fmt = end + "IIQQQQQQ", end + "IIQQQQIIQQ"
        else:
            phoff, shoff = struct.unpack_from(end + "II", data, 0x1C)
            phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(
                end + "HHHHH", data, 0x2A
            )
            ph_fmt, sh_fmt = end + "IIIIIIII", end + "IIIIIIIIII"
        interpreter = None
        for i in range(phnum):
            fields = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
            p_type = fields[0]
            if p_type != PT_INTERP:
                continue
            offset, filesz = (fields[2], fields[5]) if cls == 2 else (fields[1], fields[4])
            interpreter = data[offset : offset + filesz].rstrip(b"\0").decode("utf-8", "replace")
        names = _section_names(data, shoff, shentsize, shnum, shstrndx, sh_fmt)
    except struct.error:
        raise NotElf(path) from None
    is_go = ".go.buildinfo" in names or ".note.go.buildid" in names or _GO_MAGIC in data
    return ElfInfo(interpreter=interpreter, is_go=is_go)


def _section_names(
    data: bytes, shoff: int, shentsize: int, shnum: int, shstrndx: int, fmt: str
) -> set[str]:
    if shoff == 0 or shnum == 0 or shstrndx >= shnum:
        return set()

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from(fmt, data, shoff + i * shentsize)

    strtab = header(shstrndx)
    str_off = strtab[4]  # sh_offset sits at index 4 in both ELF-32 and ELF-64
    names = set()
    for i in range(shnum):
        name_off = header(i)[0]
        start = str_off + name_off
        stop = data.find(b"\0", start)
        if stop < 0:
            continue
        names.add(data[start:stop].decode("ascii", "replace"))
    return names
