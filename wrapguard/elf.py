"""Just enough ELF reading to tell whether the shim can see a program's socket calls.

LD_PRELOAD works only for dynamically linked programs that call libc: a static binary has no
ELF interpreter (PT_INTERP), a Go binary makes its system calls itself (it carries a
`.go.buildinfo` section, or Go's build-info magic), and a program of another ELF class or
machine cannot load the shim. All bypass the shim. This module reads headers, the dynamic
section (DT_NEEDED, DT_RUNPATH) and symbol names only (ELF-64 and ELF-32, both byte orders; the
file is mapped, not read whole) and never executes anything. It also reads a file's
capabilities (the `security.capability` xattr), which make the kernel ignore LD_PRELOAD.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field

PT_INTERP = 3
SHT_SYMTAB, SHT_DYNAMIC, SHT_DYNSYM = 2, 6, 11
DT_NULL, DT_NEEDED, DT_RPATH, DT_RUNPATH = 0, 1, 15, 29
_GO_MAGIC = b"\xff Go buildinf:"


@dataclass(frozen=True, slots=True)
class ElfInfo:
    """What an executable's ELF headers say about how it makes system calls."""

    interpreter: str | None
    is_go: bool
    needed: tuple[str, ...] = ()  # DT_NEEDED: the libraries it links, by soname
    runpath: tuple[str, ...] = ()  # DT_RUNPATH (or DT_RPATH) entries, $ORIGIN unexpanded
    symbols: frozenset[str] = field(default=frozenset(), repr=False)  # .dynsym and .symtab
    identity: tuple[int, int, int] = (0, 0, 0)  # (EI_CLASS, EI_DATA, e_machine)

    @property
    def is_static(self) -> bool:
        return self.interpreter is None


class NotElf(ValueError):
    pass


def read_elf(path: str, *, scan_limit: int = 64 << 20) -> ElfInfo:
    """Read ELF facts from `path`; raises NotElf for other files and OSError if unreadable.
    `scan_limit` bounds the search for Go's build-info magic. The same unchanged file is read
    once per process (the door choice and the launcher's refusal check both read the
    program: a 7 MB binary costs ~5 ms each time)."""
    st = os.stat(path)
    return _read_elf(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), scan_limit)


@functools.lru_cache(maxsize=32)
def _read_elf(path: str, _version: tuple[int, int, int, int], scan_limit: int) -> ElfInfo:
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise NotElf(path) from None
    with data:
        return _parse(path, data, scan_limit)


def _parse(path: str, data: mmap.mmap, scan_limit: int) -> ElfInfo:
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
            ph_fmt, sh_fmt, dyn_fmt = end + "IIQQQQQQ", end + "IIQQQQIIQQ", end + "qQ"
        else:
            phoff, shoff = struct.unpack_from(end + "II", data, 0x1C)
            phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(
                end + "HHHHH", data, 0x2A
            )
            ph_fmt, sh_fmt, dyn_fmt = end + "IIIIIIII", end + "IIIIIIIIII", end + "iI"
        (machine,) = struct.unpack_from(end + "H", data, 0x12)  # e_machine: same offset in both
        interpreter = None
        for i in range(phnum):
            fields = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
            p_type = fields[0]
            if p_type != PT_INTERP:
                continue
            offset, filesz = (fields[2], fields[5]) if cls == 2 else (fields[1], fields[4])
            interpreter = data[offset : offset + filesz].rstrip(b"\0").decode("utf-8", "replace")
        sections = _sections(data, shoff, shentsize, shnum, sh_fmt)
        names = _section_names(data, sections, shstrndx)
        needed, runpath = _dynamic(data, sections, dyn_fmt)
        symbols = _symbols(data, sections, end)
    except struct.error:
        raise NotElf(path) from None
    is_go = (
        ".go.buildinfo" in names
        or ".note.go.buildid" in names
        or data.find(_GO_MAGIC, 0, scan_limit) >= 0
    )
    return ElfInfo(interpreter, is_go, needed, runpath, symbols, (cls, enc, machine))


_MACHINES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM"}
_MACHINES |= {62: "x86-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch"}


def describe_identity(identity: tuple[int, int, int]) -> str:
    """ "64-bit x86-64", "32-bit i386", "64-bit PowerPC64 big-endian"..."""
    cls, enc, machine = identity
    text = f"{32 if cls == 1 else 64}-bit {_MACHINES.get(machine, f'machine {machine}')}"
    return text + (" big-endian" if enc == 2 else "")


# A section header as (name, type, offset, size, link, entsize): the fields used here sit at
# the same indices in ELF-32 and ELF-64 (sh_name 0, sh_type 1, sh_offset 4, sh_size 5,
# sh_link 6, sh_entsize 9).
_Section = tuple[int, int, int, int, int, int]


def _sections(data: mmap.mmap, shoff: int, shentsize: int, shnum: int, fmt: str) -> list[_Section]:
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(data):
        return []
    out = []
    for i in range(shnum):
        h = struct.unpack_from(fmt, data, shoff + i * shentsize)
        out.append((h[0], h[1], h[4], h[5], h[6], h[9]))
    return out


def _string(data: mmap.mmap, table: _Section, off: int) -> str | None:
    start = table[2] + off
    stop = data.find(b"\0", start, table[2] + table[3])
    return None if stop < 0 else data[start:stop].decode("utf-8", "replace")


def _section_names(data: mmap.mmap, sections: list[_Section], shstrndx: int) -> set[str]:
    if shstrndx >= len(sections):
        return set()
    strtab = sections[shstrndx]
    return {n for s in sections if (n := _string(data, strtab, s[0])) is not None}


def _dynamic(
    data: mmap.mmap, sections: list[_Section], fmt: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """DT_NEEDED sonames and DT_RUNPATH (else DT_RPATH) directories, in file order."""
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    size = struct.calcsize(fmt)
    for sec in sections:
        if sec[1] != SHT_DYNAMIC or sec[4] >= len(sections) or sec[2] + sec[3] > len(data):
            continue
        strtab = sections[sec[4]]
        for tag, val in struct.iter_unpack(fmt, data[sec[2] : sec[2] + sec[3] // size * size]):
            if tag == DT_NULL:
                break
            if tag in (DT_NEEDED, DT_RUNPATH, DT_RPATH):
                text = _string(data, strtab, val)
                if text is None:
                    continue
                if tag == DT_NEEDED:
                    needed.append(text)
                else:
                    (runpath if tag == DT_RUNPATH else rpath).extend(text.split(":"))
    return tuple(needed), tuple(d for d in runpath or rpath if d)


def _symbols(data: mmap.mmap, sections: list[_Section], end: str) -> frozenset[str]:
    """Names in .dynsym and .symtab (defined or not): st_name is the first word of both."""
    names: set[str] = set()
    for sec in sections:
        entsize = sec[5]
        if sec[1] not in (SHT_DYNSYM, SHT_SYMTAB) or entsize < 4 or sec[4] >= len(sections):
            continue
        if sec[2] + sec[3] > len(data):
            continue
        strtab = sections[sec[4]]
        if strtab[2] + strtab[3] > len(data):
            continue
        table = data[strtab[2] : strtab[2] + strtab[3]]
        fmt = f"{end}I{entsize - 4}x"
        for (off,) in struct.iter_unpack(fmt, data[sec[2] : sec[2] + sec[3] // entsize * entsize]):
            stop = table.find(b"\0", off)
            if off and stop > off:
                names.add(table[off:stop].decode("utf-8", "replace"))
    return frozenset(names)


# -- file capabilities ------------------------------------------------------------------------
# security.capability holds a vfs_cap_data (linux/capability.h): le32 magic_etc (revision in
# the top byte, VFS_CAP_FLAGS_EFFECTIVE in bit 0), then le32 permitted and inheritable words,
# once (revision 1) or twice (revision 2; revision 3 adds the root uid of a user namespace).
XATTR_CAPS = "security.capability"
_CAP_REVISION_MASK, _CAP_FLAGS_EFFECTIVE = 0xFF000000, 0x1
_CAP_WORDS = {0x01000000: 1, 0x02000000: 2, 0x03000000: 2}
# capability.h order: bit n is CAP_NAMES[n]
CAP_NAMES = (
    "cap_chown", "cap_dac_override", "cap_dac_read_search", "cap_fowner", "cap_fsetid", "cap_kill",
    "cap_setgid", "cap_setuid", "cap_setpcap", "cap_linux_immutable", "cap_net_bind_service",
    "cap_net_broadcast", "cap_net_admin", "cap_net_raw", "cap_ipc_lock", "cap_ipc_owner",
    "cap_sys_module", "cap_sys_rawio", "cap_sys_chroot", "cap_sys_ptrace", "cap_sys_pacct",
    "cap_sys_admin", "cap_sys_boot", "cap_sys_nice", "cap_sys_resource", "cap_sys_time",
    "cap_sys_tty_config", "cap_mknod", "cap_lease", "cap_audit_write", "cap_audit_control",
    "cap_setfcap", "cap_mac_override", "cap_mac_admin", "cap_syslog", "cap_wake_alarm",
    "cap_block_suspend", "cap_audit_read", "cap_perfmon", "cap_bpf", "cap_checkpoint_restore",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FileCaps:
    """A file's capabilities (its security.capability attribute)."""

    permitted: int
    inheritable: int
    effective: bool

    def grants(self, inheritable_now: int) -> bool:
        """Does exec raise privileges? The new permitted set is fP | (fI & pI); with it non-empty
        or the effective flag set, the kernel runs the program in secure-execution mode for a
        caller whose real uid is not 0 (security/commoncap.c, cap_bprm_creds_from_file)."""
        return self.effective or bool(self.permitted | self.inheritable & inheritable_now)

    def __str__(self) -> str:
        """As getcap(8) writes them: "cap_net_bind_service=ep"."""
        groups: dict[str, list[str]] = {}
        for bit in range(64):
            sets = ("i" if self.inheritable >> bit & 1 else "") + (
                "p" if self.permitted >> bit & 1 else ""
            )
            if sets:
                name = CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"cap_{bit}"
                groups.setdefault(("e" if self.effective else "") + sets, []).append(name)
        if not groups:
            return "=e" if self.effective else "none"
        return " ".join(f"{','.join(names)}={flags}" for flags, names in groups.items())


def parse_file_caps(raw: bytes) -> FileCaps | None:
    """A security.capability value; None for one the kernel rejects (it then fails the exec)."""
    if len(raw) < 4:
        return None
    (magic,) = struct.unpack_from("<I", raw)
    words = _CAP_WORDS.get(magic & _CAP_REVISION_MASK)
    if words is None or len(raw) < 4 + 8 * words:
        return None
    permitted = inheritable = 0
    for w in range(words):
        p, i = struct.unpack_from("<II", raw, 4 + 8 * w)
        permitted |= p << (32 * w)
        inheritable |= i << (32 * w)
    return FileCaps(permitted, inheritable, bool(magic & _CAP_FLAGS_EFFECTIVE))


def read_file_caps(path: str) -> FileCaps | None:
    """The file capabilities of `path`, or None (none, or a filesystem without xattrs)."""
    try:
        raw = os.getxattr(path, XATTR_CAPS)
    except OSError:
        return None
    return parse_file_caps(raw)
