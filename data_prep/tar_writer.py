"""The tar writer of data_prep/shard.py: deterministic ustar members, written fast.

Kept instead of ``webdataset.TarWriter`` because it is measurably faster on the bundled data:
``python benchmarks/data.py`` prints both (rows ``tar_writer`` and ``webdataset_tarwriter``).
Measured 2026-12-07 on this project's 2-core CPU machine (``python benchmarks/data.py --repeats 5``):
18.5x ``TarWriter``'s samples/s on the bundled digits (56 px PNGs: per-member header cost
dominates) and 5.0x on 512 px JPEGs.  If a webdataset release closes that gap, use its writer.
"""
from __future__ import annotations

import functools
import tarfile

TAR_MTIME = 0  # fixed member metadata: byte-identical tars on every machine and rerun


class TarOut:
    """A minimal deterministic tar writer: standard ustar members (a GNU long-name record for a
    name over 100 bytes), mtime 0, uid/gid 0, owner coma, mode 0444, in the order written,
    closed with two zero blocks and padded to tar's 10 KiB record like ``tarfile`` does.

    Why not ``webdataset.TarWriter``: it goes through ``tarfile``'s generic header code, which
    costs as much per sample as decoding a small PNG (measured with benchmarks/data.py), i.e.
    half of shard.py's throughput on small images.  The headers here are byte-identical to
    ``tarfile``'s ustar headers for the same fields (tests/test_shard.py checks that).
    """

    def __init__(self, f):
        self.f, self.size = f, 0

    def _put(self, b: bytes) -> None:
        self.f.write(b)
        self.size += len(b)

    def write(self, sample: dict) -> None:
        """A sample as ``{"__key__": key, ext: bytes, ...}`` → members ``key.ext``, sorted.

        The whole sample goes out as one joined buffer in one ``write``, and the key's part of
        the header checksum is summed once: on small images the per-member overhead is what
        shard.py spends its time on."""
        key = sample["__key__"].encode("utf-8")
        key_sum = _USTAR_SUM + sum(key)
        parts: list = []
        put = parts.extend
        for ext in sorted(sample):
            if ext[0] == "_":
                continue
            dot_ext, ext_sum = _dot_ext(ext)
            data = sample[ext]
            name, n = key + dot_ext, len(data)
            if len(name) <= 100:
                # header pieces, data and padding all go into the one join below (no copy of
                # the data per member); the checksum is the template's plus the variable bytes'
                field, field_sum = _size_field(n)
                put((name.ljust(100, b"\0"), _USTAR_MODE_IDS, field, _USTAR_MTIME,
                     b"%06o\0 " % (key_sum + ext_sum + field_sum), _USTAR_TAIL, data, _PADS[-n % 512]))
            else:
                put((_gnu_header(name, n), data, _PADS[-n % 512]))
        self._put(b"".join(parts))

    def close(self) -> None:
        self._put(b"\0" * 1024)
        if self.size % 10240:
            self._put(b"\0" * (10240 - self.size % 10240))


def _ustar_template() -> bytes:
    h = bytearray(512)
    h[100:108] = b"0000444\0"                 # mode
    h[108:116] = h[116:124] = b"0000000\0"    # uid, gid
    h[136:148] = b"%011o\0" % TAR_MTIME
    h[148:156] = b"        "                  # checksum placeholder (spaces, as the checksum counts them)
    h[156:157] = b"0"                         # regular file
    h[257:265] = b"ustar\x0000"
    h[265:269] = h[297:301] = b"coma"         # uname, gname
    # devmajor/devminor (329:345) stay NUL for a regular file, as tarfile writes them
    return bytes(h)


_USTAR = _ustar_template()
_USTAR_SUM = sum(_USTAR)
_PADS = [bytes(n) for n in range(512)]  # zero padding to the next 512-byte block, prebuilt


# A ustar header of a name of at most 100 bytes is: name (NUL-padded to 100), _USTAR_MODE_IDS,
# the size field (12), _USTAR_MTIME, the checksum field (8), _USTAR_TAIL.
_USTAR_MODE_IDS, _USTAR_MTIME, _USTAR_TAIL = _USTAR[100:124], _USTAR[136:148], _USTAR[156:]


def _size_field(size: int, _cache: dict = {}) -> tuple[bytes, int]:
    """The octal size field and its byte sum; cached below 64 KiB, where sizes repeat across
    samples (captions, JSON, small images)."""
    hit = _cache.get(size)
    if hit is None:
        field = b"%011o\0" % size
        hit = (field, sum(field))
        if size < 1 << 16:
            _cache[size] = hit
    return hit


def _gnu_header(name: bytes, size: int) -> bytes:
    """A GNU long-name record + header, for a name over ustar's 100 bytes (rare: long keys)."""
    ti = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, TAR_MTIME, 0o444, "coma", "coma"
    return ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


@functools.lru_cache(maxsize=None)
def _dot_ext(ext: str) -> tuple[bytes, int]:
    """``".ext"`` as bytes and the sum of those bytes (its share of a header checksum)."""
    b = f".{ext}".encode("utf-8")
    return b, sum(b)
