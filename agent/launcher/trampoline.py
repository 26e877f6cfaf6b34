"""A tiny static x86-64 program that only execve's its arguments, kept in a sealed memfd: the
last step between the launcher's forked (Python) container init and the container's program.

Why: the container's PID 1 is a fork of the launcher, so its /proc/self/exe is the host's
Python interpreter until it executes the container's program. If that program is a script
starting with ``#!/proc/self/exe``, the kernel resolves the interpreter while the old exe is
still current, and the container would run - and keep an O_PATH handle on - the host's
interpreter, which it can reopen for writing once that process has exited (CVE-2019-5736).
Executing this trampoline from a sealed memfd first (``execveat(fd, "", ..., AT_EMPTY_PATH)``,
what ``os.execve(fd, ...)`` does) makes /proc/self/exe a file the kernel refuses to change, for
the container's exec and everything after it. This costs ~0.2 ms; the alternative, a second
interpreter started from a sealed copy (selfexe.py), costs ~25 ms on the critical path.

Calling convention: ``argv = [path, arg0, arg1, ...]``; the trampoline runs
``execve(path, [arg0, arg1, ...], envp)``. On failure it writes
``oci-launcher: executing the container process failed: errno NNN`` to fd 2 and exits 127.

Properties that make two execs behave as one:

* capabilities: for uid 0, execve recomputes permitted/effective from the bounding and
  inheritable sets, which the first exec does not change, so the second gives the same sets;
  for other uids only the ambient set survives, and it survives both (the memfd carries no file
  capabilities and no set-id bits, so nothing clears it);
* no_new_privs and the seccomp filter are inherited; the filter sees one ``execveat`` more
  (callers check the profile allows it: :func:`usable_with`) and the ``execve`` it sees anyway;
* no /proc is needed inside the container: the memfd is opened close-on-exec and executed by
  fd, which the kernel allows for an ELF binary, and the fd is gone after the exec;
* it has no dynamic loader, no libc and writes no memory except four bytes of stack for the
  error text.

Other architectures: :func:`available` is false and the launcher keeps the sealed interpreter
copy.
"""
from __future__ import annotations

import os

_BASE = 0x400000  # load address of the single PT_LOAD segment
_EHDR = 64  # sizeof(Elf64_Ehdr)
_PHDR = 56  # sizeof(Elf64_Phdr)

_MESSAGE = b"oci-launcher: executing the container process failed: errno "


def _le(*fields: tuple[int, int]) -> bytes:
    """(value, size) pairs as little-endian integers (struct.pack without importing it)."""
    return b"".join(v.to_bytes(n, "little", signed=v < 0) for v, n in fields)

# (machine code, instruction) pairs; the text column is the Intel-syntax instruction the bytes
# encode (tests/launcher/test_trampoline.py assembles it with binutils and compares).
# At entry (System V x86-64 ABI): [rsp] = argc, [rsp+8..] = argv pointers, NULL, envp, NULL.
_CODE_HEAD = [
    (b"\x48\x8b\x7c\x24\x08", "mov rdi, QWORD PTR [rsp+0x8]"),     # path = argv[0]
    (b"\x48\x8d\x74\x24\x10", "lea rsi, [rsp+0x10]"),              # argv' = &argv[1]
    (b"\x48\x8b\x04\x24", "mov rax, QWORD PTR [rsp]"),            # argc
    (b"\x48\x8d\x54\xc4\x10", "lea rdx, [rsp+rax*8+0x10]"),        # envp = &argv[argc + 1]
    (b"\xb8\x3b\x00\x00\x00", "mov eax, 0x3b"),                    # SYS_execve
    (b"\x0f\x05", "syscall"),
    # only reached when execve failed: eax = -errno
    (b"\xf7\xd8", "neg eax"),
    (b"\x41\x89\xc0", "mov r8d, eax"),                             # keep errno
    (b"\xbf\x02\x00\x00\x00", "mov edi, 0x2"),                     # fd 2
    # lea rsi, [rip + message]: displacement filled in by _build
]
_CODE_TAIL = [
    (b"\xba" + _le((len(_MESSAGE), 4)), f"mov edx, {hex(len(_MESSAGE))}"),
    (b"\xb8\x01\x00\x00\x00", "mov eax, 0x1"),                     # SYS_write
    (b"\x0f\x05", "syscall"),
    # errno as three decimal digits and a newline at [rsp-4 .. rsp-1] (the red zone)
    (b"\x44\x89\xc0", "mov eax, r8d"),
    (b"\xb9\x0a\x00\x00\x00", "mov ecx, 0xa"),
    (b"\xc6\x44\x24\xff\x0a", "mov BYTE PTR [rsp-0x1], 0xa"),
    (b"\x31\xd2", "xor edx, edx"),
    (b"\xf7\xf1", "div ecx"),                                      # eax /= 10, edx = digit
    (b"\x80\xc2\x30", "add dl, 0x30"),
    (b"\x88\x54\x24\xfe", "mov BYTE PTR [rsp-0x2], dl"),
    (b"\x31\xd2", "xor edx, edx"),
    (b"\xf7\xf1", "div ecx"),
    (b"\x80\xc2\x30", "add dl, 0x30"),
    (b"\x88\x54\x24\xfd", "mov BYTE PTR [rsp-0x3], dl"),
    (b"\x31\xd2", "xor edx, edx"),
    (b"\xf7\xf1", "div ecx"),
    (b"\x80\xc2\x30", "add dl, 0x30"),
    (b"\x88\x54\x24\xfc", "mov BYTE PTR [rsp-0x4], dl"),
    (b"\xbf\x02\x00\x00\x00", "mov edi, 0x2"),
    (b"\x48\x8d\x74\x24\xfc", "lea rsi, [rsp-0x4]"),
    (b"\xba\x04\x00\x00\x00", "mov edx, 0x4"),
    (b"\xb8\x01\x00\x00\x00", "mov eax, 0x1"),                     # SYS_write
    (b"\x0f\x05", "syscall"),
    (b"\xbf\x7f\x00\x00\x00", "mov edi, 0x7f"),                    # status 127
    (b"\xb8\xe7\x00\x00\x00", "mov eax, 0xe7"),                    # SYS_exit_group
    (b"\x0f\x05", "syscall"),
]
_LEA_RSI_RIP = b"\x48\x8d\x35"  # lea rsi, [rip + disp32]


def _code() -> bytes:
    head = b"".join(c for c, _ in _CODE_HEAD)
    tail = b"".join(c for c, _ in _CODE_TAIL)
    # rip-relative displacement counts from the end of the 7-byte lea to the message
    disp = len(tail)
    return head + _LEA_RSI_RIP + _le((disp, 4)) + tail + _MESSAGE


def build() -> bytes:
    """The ELF image: header, one read+execute PT_LOAD segment mapping the whole file, code."""
    code = _code()
    size = _EHDR + _PHDR + len(code)
    entry = _BASE + _EHDR + _PHDR
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, v1, SysV
    # e_type ET_EXEC, e_machine EM_X86_64, e_version, e_entry, e_phoff, e_shoff (none),
    # e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    ehdr = ident + _le((2, 2), (0x3E, 2), (1, 4), (entry, 8), (_EHDR, 8), (0, 8), (0, 4),
                       (_EHDR, 2), (_PHDR, 2), (1, 2), (0, 2), (0, 2), (0, 2))
    # p_type PT_LOAD, p_flags R+X, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    phdr = _le((1, 4), (5, 4), (0, 8), (_BASE, 8), (_BASE, 8), (size, 8), (size, 8),
               (0x1000, 8))
    return ehdr + phdr + code


def available() -> bool:
    return os.uname().machine == "x86_64"


_fd: int | None = None


def sealed_fd() -> int:
    """A close-on-exec memfd holding the trampoline, sealed against any change (one per
    process; forks inherit it)."""
    global _fd
    if _fd is None:
        import fcntl
        fd = os.memfd_create("oci-launcher-exec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, build())
            os.fchmod(fd, 0o555)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK |
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        except BaseException:
            os.close(fd)
            raise
        _fd = fd
    return _fd


def usable_with(seccomp_plan) -> bool:
    """Whether the container's seccomp filter (a seccomp.FilterPlan, or None) lets the extra
    ``execveat`` through unconditionally."""
    if seccomp_plan is None:
        return True
    return seccomp_plan.allows_plainly("execveat")


def execve(fd: int, path: str, args: list[str], env: dict[str, str]) -> None:
    """Replace this process with ``path``, going through the trampoline in ``fd``."""
    os.execve(fd, [path, *args], env)
