"""Streaming reader for tar headers (ustar, POSIX pax, GNU long names) over a non-seekable stream.

Our own parser rather than `tarfile` because the unpacker needs: control over buffering (one
large read from the decompressor serves many small members), byte and entry caps enforced while
reading, raw xattr values from pax records, and tolerance of a stream that ends right after the
last member's data (umoci writes layers without the final padding and the two zero blocks).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO
from zlib import adler32

BLOCK = 512
CHUNK = 1 << 20

# typeflags
REG = b"0"
AREG = b"\0"
LNK = b"1"
SYM = b"2"
CHR = b"3"
BLK = b"4"
DIR = b"5"
FIFO = b"6"
CONT = b"7"
PAX = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
REGULAR_TYPES = (REG, AREG, CONT)


# name mode uid gid size mtime chksum typeflag linkname magic+version uname gname
# devmajor devminor prefix (GNU's atime/ctime/... live in the prefix area; ignored)
_HDR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")


class TarFormatError(Exception):
    """The stream is not a tar archive we accept; `offset` is where the bad header starts."""

    def __init__(self, msg: str, offset: int, name: str | None = None):
        super().__init__(msg)
        self.offset = offset
        self.name = name


class TarLimitError(TarFormatError):
    """A cap from the caller (bytes, metadata size) was exceeded."""


@dataclass(slots=True)
class Member:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _fnum(field_: bytes, what: str, offset: int) -> int:
    """Fast path for the common NUL/space-terminated octal; anything odd goes to _num."""
    s = field_.strip(b"\0 ")
    if s.isdigit():  # strict: int() alone would also take signs and underscores
        try:
            return int(s, 8)
        except ValueError:
            pass
    elif not s:
        return 0
    return _num(field_, what, offset)


def _num(field_: bytes, what: str, offset: int) -> int:
    if field_ and field_[0] & 0x80:
        # GNU base-256: big-endian two's complement, first byte's top bit is only the marker
        if field_[0] == 0xFF:
            return int.from_bytes(field_, "big", signed=True)
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    s = _cstr(field_).strip(b" ")
    if not s:
        return 0
    if s.isdigit():
        try:
            return int(s, 8)
        except ValueError:
            pass
    raise TarFormatError(f"bad octal number in {what} field: {field_!r}", offset)


def _pax_time_ns(v: bytes, key: str, offset: int) -> int:
    """Decimal seconds with an optional fraction ("1700000000.123456789", "-1.5") -> ns."""
    sec, _, frac = v.partition(b".")
    neg = sec.startswith(b"-")
    if neg:
        sec = sec[1:]
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise TarFormatError(f"bad pax {key} value {v!r}", offset)
    ns = int(sec) * 1_000_000_000
    if frac:
        ns += int(frac[:9].ljust(9, b"0"))
    return -ns if neg else ns


def parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    """Records are `<len> <key>=<value>\\n`, len counting the whole record in bytes."""
    out: dict[str, bytes] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # trailing NUL padding some writers leave
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise TarFormatError("bad pax record: no length", offset)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarFormatError(f"bad pax record length {data[pos:sp]!r}", offset) from None
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1] != 0x0A:
            raise TarFormatError("bad pax record: length does not match", offset)
        eq = data.find(b"=", sp + 1, end)
        if eq < 0:
            raise TarFormatError("bad pax record: no '='", offset)
        out[data[sp + 1:eq].decode("utf-8", "surrogateescape")] = data[eq + 1:end - 1]
        pos = end
    return out


class TarReader:
    """Iterate members of a tar stream; the caller consumes each member's data before next()."""

    def __init__(self, raw: BinaryIO, *, max_bytes: int, max_meta: int = 1 << 20):
        self._raw = raw
        # readinto1 where there is one: a buffered pipe's readinto blocks until the whole
        # buffer is full, which would stall the unpack behind a slow download
        self._readinto = getattr(raw, "readinto1", None) or getattr(raw, "readinto", None)
        self._buf = bytearray(CHUNK)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.bytes_read = 0  # consumed from `raw`
        self.offset = 0  # logical position in the archive
        self.max_bytes = max_bytes
        self.max_meta = max_meta
        self._remaining = 0  # data bytes of the current member not yet consumed
        self._pad = 0
        self._global: dict[str, bytes] = {}
        self.ended_cleanly = False

    # --- raw buffered input ---
    # One reusable buffer filled with readinto(): a fresh 1 MiB bytes object per read would
    # cost page faults on every chunk, which showed as a large share of the unpack time.

    def _read_into(self, mv: memoryview) -> int:
        if self._readinto is not None:
            got = self._readinto(mv) or 0
        else:
            data = self._raw.read(len(mv))
            got = len(data)
            mv[:got] = data
        if got:
            self.bytes_read += got
            if self.bytes_read > self.max_bytes:
                raise TarLimitError(
                    f"layer is larger than the limit of {self.max_bytes} bytes", self.offset
                )
        return got

    def _fill(self, n: int) -> int:
        """Make at least n bytes available in the buffer unless the stream ends; return count."""
        avail = self._end - self._pos
        if avail >= n:
            return avail
        if n > len(self._buf):
            grown = bytearray(max(n, 2 * len(self._buf)))
            grown[:avail] = self._mv[self._pos:self._end]
            self._buf, self._mv = grown, memoryview(grown)
        elif avail:
            # bytes(): a copy, since source and destination overlap in the same buffer
            self._buf[:avail] = bytes(self._mv[self._pos:self._end])
        self._pos, self._end = 0, avail
        while self._end < n:
            got = self._read_into(self._mv[self._end:])
            if not got:
                break
            self._end += got
        return self._end

    def _take(self, n: int) -> bytes:
        got = self._fill(n)
        k = n if got >= n else got
        data = bytes(self._mv[self._pos:self._pos + k])
        self._pos += k
        self.offset += k
        return data

    def _skip(self, n: int) -> int:
        got = self._fill(n)
        k = n if got >= n else got
        self._pos += k
        self.offset += k
        return k

    # --- member data ---

    def read_data(self, n: int | None = None) -> bytes:
        n = self._remaining if n is None else min(n, self._remaining)
        data = self._take(n)
        if len(data) < n:
            raise TarFormatError("archive truncated inside member data", self.offset)
        self._remaining -= n
        return data

    def copy_data(self, fd: int) -> int:
        """Write the rest of the current member's data to fd."""
        n = self._remaining
        total = n
        mv = self._mv
        while n:
            avail = self._end - self._pos
            if not avail:
                self._pos = self._end = 0
                avail = self._read_into(mv)
                if not avail:
                    break
                self._end = avail
            k = avail if avail < n else n
            _write_all(fd, mv[self._pos:self._pos + k])
            self._pos += k
            n -= k
        self.offset += total - n
        self._remaining = n
        if n:
            raise TarFormatError("archive truncated inside member data", self.offset)
        return total

    def skip_data(self) -> None:
        n = self._remaining
        while n > 0:
            got = self._skip(min(n, CHUNK))
            if not got:
                raise TarFormatError("archive truncated inside member data", self.offset)
            n -= got
        self._remaining = 0

    def _finish_member(self) -> bool:
        """Skip unread data and padding. False if the stream ended inside the padding."""
        if self._remaining:
            self.skip_data()
        if self._pad:
            got = self._skip(self._pad)
            pad, self._pad = self._pad, 0
            if got < pad:
                return False  # umoci-style truncated end: data complete, padding missing
        return True

    # --- headers ---

    def next(self) -> Member | None:
        if (self._remaining or self._pad) and not self._finish_member():
            return None
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            start = self.offset
            pos = self._pos
            if self._end - pos >= BLOCK:  # the common case, inline
                hdr = self._buf[pos:pos + BLOCK]
                self._pos = pos + BLOCK
                self.offset = start + BLOCK
            else:
                hdr = self._take(BLOCK)
                if len(hdr) < BLOCK:
                    if hdr.strip(b"\0"):
                        raise TarFormatError("archive truncated inside a header", start)
                    return None  # no end blocks: accepted, as runc and umoci do
            if not hdr[0] and hdr.count(0) == BLOCK:
                self.ended_cleanly = True
                return None
            f = _HDR.unpack(hdr)
            self._check_sum(hdr, f[6], start)
            typ = f[7]
            size = _fnum(f[4], "size", start)
            if size < 0:
                raise TarFormatError("negative member size", start)
            if typ in (PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                if size > self.max_meta:
                    raise TarLimitError(
                        f"metadata header of {size} bytes exceeds the limit of {self.max_meta}",
                        start,
                    )
                data = self._take(size)
                if len(data) < size:
                    raise TarFormatError("archive truncated inside a metadata header", start)
                self._take(-size % BLOCK)
                if typ == PAX:
                    if pax:
                        pax.update(parse_pax(data, start))
                    else:
                        pax = parse_pax(data, start)
                elif typ == PAX_GLOBAL:
                    self._global.update(parse_pax(data, start))
                elif typ == GNU_LONGNAME:
                    longname = _cstr(data)
                else:
                    longlink = _cstr(data)
                continue
            m = self._member(f, typ, size, start, pax, longname, longlink)
            # header-only types carry no data even when a writer records a size (as Go's
            # archive/tar and Python's tarfile also read them)
            header_only = m.type in (LNK, SYM, CHR, BLK, DIR, FIFO)
            self._remaining = 0 if header_only else m.size
            self._pad = -self._remaining % BLOCK
            return m

    @staticmethod
    def _check_sum(hdr: bytes, field_: bytes, offset: int) -> None:
        want = _fnum(field_, "checksum", offset)
        # the sum of the header bytes with the checksum field counted as spaces; adler32's low
        # half is 1 + the byte sum mod 65521, exact for runs of <= 256 bytes, and C-fast
        unsigned = ((adler32(hdr[:148]) & 0xFFFF) + (adler32(hdr[156:412]) & 0xFFFF)
                    + (adler32(hdr[412:]) & 0xFFFF) - 3 + 8 * 32)
        if want == unsigned:
            return
        signed = unsigned - 2 * sum(b for b in hdr[:148] + hdr[156:] if b >= 128)
        if want != signed:
            raise TarFormatError(
                f"header checksum mismatch (stored {want}, computed {unsigned})", offset
            )

    def _member(self, f: tuple, typ: bytes, size: int, start: int, pax: dict[str, bytes],
                longname: bytes | None, longlink: bytes | None) -> Member:
        if longname is not None:
            name = _decode(longname)
        else:
            name_b = _cstr(f[0])
            if f[9][:6] == b"ustar\0":  # POSIX: the prefix field extends the name
                prefix = _cstr(f[14])
                if prefix:
                    name_b = prefix + b"/" + name_b
            name = _decode(name_b)
        if longlink is not None:
            link = _decode(longlink)
        else:
            link = _decode(_cstr(f[8])) if f[8][0] else ""
        m = Member(name, typ, _fnum(f[1], "mode", start) & 0o7777, _fnum(f[2], "uid", start),
                   _fnum(f[3], "gid", start), size, _fnum(f[5], "mtime", start) * 1_000_000_000,
                   None, link)
        m.offset = start
        if typ == CHR or typ == BLK:
            m.devmajor = _fnum(f[12], "devmajor", start)
            m.devminor = _fnum(f[13], "devminor", start)
        if self._global:
            merged = dict(self._global)
            merged.update(pax)
            self._apply_pax(m, merged, start)
        elif pax:
            self._apply_pax(m, pax, start)
        return m

    @staticmethod
    def _apply_pax(m: Member, pax: dict[str, bytes], start: int) -> None:
        for key, val in pax.items():
            if key.startswith("SCHILY.xattr."):
                m.xattrs[key[13:]] = val
                continue
            if key.startswith("GNU.sparse."):
                raise TarFormatError("sparse files are not supported", start, m.name)
            if not val:
                continue  # an empty value cancels a global value: keep the header's
            if key in _PAX_INTS and not val.isdigit():
                # strict, like Go's archive/tar: no signs, spaces or underscores, so no two
                # parsers read a different size from the same header
                raise TarFormatError(f"bad pax {key} value {val!r}", start, m.name)
            try:
                if key == "path":
                    m.name = _decode(val)
                elif key == "linkpath":
                    m.linkname = _decode(val)
                elif key == "size":
                    m.size = int(val)
                elif key == "uid":
                    m.uid = int(val)
                elif key == "gid":
                    m.gid = int(val)
                elif key == "mtime":
                    m.mtime_ns = _pax_time_ns(val, key, start)
                elif key == "atime":
                    m.atime_ns = _pax_time_ns(val, key, start)
                elif key == "SCHILY.devmajor":
                    m.devmajor = int(val)
                elif key == "SCHILY.devminor":
                    m.devminor = int(val)
            except ValueError:
                raise TarFormatError(f"bad pax {key} value {val!r}", start, m.name) from None
        if m.size < 0 or m.uid < 0 or m.gid < 0:
            raise TarFormatError("negative size, uid or gid in pax header", start, m.name)

    def drain(self) -> int:
        """Read the stream to its end (so a caller's hash covers every byte); return count."""
        n = self._end - self._pos
        self._pos = self._end = 0
        while True:
            got = self._read_into(self._mv)
            if not got:
                return n
            n += got


_PAX_INTS = frozenset({"size", "uid", "gid", "SCHILY.devmajor", "SCHILY.devminor"})


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
