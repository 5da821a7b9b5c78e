"""The packed file: a fixed preamble, a JSON header, binary sections, one SHA-256 over both.

Layout (all integers little-endian)::

    0   8 bytes   magic  b"SLKPACK\\0"
    8   uint32    container version (1)
    12  uint64    header length H
    20  uint64    payload length P
    28  32 bytes  SHA-256 of header ‖ payload
    60  H bytes   header: UTF-8 JSON (format name and version, precision, tensors, interfaces,
                  coding steps, files, section table, statistics)
    60+H P bytes  payload: sections back to back; the header's ``sections`` lists
                  ``[offset, length, raw_length, codec]`` per section (``codec`` "zlib" or "raw")

No pickle anywhere.  Reading checks the magic, the version, the lengths (a truncated file is
reported as such) and the checksum before anything is decoded, so a damaged file gives one
clear :class:`~slicekit.errors.SlicekitError` instead of garbage weights.  Writing goes to a
temporary file in the target directory that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib
from typing import Any

from slicekit.errors import SlicekitError

MAGIC = b"SLKPACK\0"
CONTAINER_VERSION = 1
_PRE = struct.Struct("<8sIQQ32s")


class SectionWriter:
    """Collects binary sections; :meth:`add` returns the section's index for the header."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.table: list[list[Any]] = []
        self.size = 0

    def add(self, data: bytes | memoryview, compress: bool = True) -> int:
        """Add a section; ``data`` may be any bytes-like object (kept, not copied, when not
        compressed — the ANS stream is hundreds of MB for a 135M-parameter model)."""
        data = memoryview(data).cast("B")
        raw_len = len(data)
        codec = "raw"
        if compress and raw_len > 64:
            packed = zlib.compress(data, 6)
            if len(packed) < raw_len:
                data, codec = packed, "zlib"
        self.table.append([self.size, len(data), raw_len, codec])
        self.parts.append(data)
        self.size += len(data)
        return len(self.table) - 1


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts like a packed model (cheap; no checksum)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except (OSError, IsADirectoryError):
        return False


def write_container(path: str, header: dict[str, Any], sections: SectionWriter) -> int:
    """Write atomically; returns the file size in bytes."""
    if sys.byteorder != "little":
        raise SlicekitError("packing needs a little-endian machine")
    header = dict(header, sections=sections.table)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256()
    digest.update(head)
    for part in sections.parts:
        digest.update(part)
    pre = _PRE.pack(MAGIC, CONTAINER_VERSION, len(head), sections.size, digest.digest())
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise SlicekitError(f"output {path} is a directory; give a file name for the packed model")
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pre)
            fh.write(head)
            for part in sections.parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a packed model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _PRE.size + len(head) + sections.size


class Container:
    """A verified packed file in memory: ``header`` and ``section(i)``."""

    def __init__(self, header: dict[str, Any], payload: memoryview) -> None:
        self.header = header
        self.payload = payload

    def raw_view(self, index: int) -> memoryview:
        """An uncompressed section without copying it (the ANS stream)."""
        offset, length, raw_len, codec = self.header["sections"][int(index)]
        if codec != "raw" or length != raw_len or offset < 0 or offset + length > len(self.payload):
            raise SlicekitError(f"packed file section {index} is not a raw section inside the payload: corrupt")
        return self.payload[offset:offset + length]

    def section(self, index: int) -> bytes:
        try:
            offset, length, raw_len, codec = self.header["sections"][int(index)]
        except (IndexError, KeyError, TypeError, ValueError) as err:
            raise SlicekitError(f"packed file header refers to a missing section {index!r}") from err
        if offset < 0 or offset + length > len(self.payload):
            raise SlicekitError("packed file header has a section outside the payload: the file is corrupt")
        data = bytes(self.payload[offset:offset + length])
        if codec == "zlib":
            try:
                data = zlib.decompress(data)
            except zlib.error as err:
                raise SlicekitError(f"packed file section {index} does not decompress: the file is corrupt") from err
        if len(data) != raw_len:
            raise SlicekitError(f"packed file section {index} has the wrong length: the file is corrupt")
        return data


def read_container(path: str | os.PathLike) -> Container:
    """Read and verify a packed file (magic, version, lengths, checksum, JSON header)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise SlicekitError(f"no such packed model file: {name}")
    with open(name, "rb") as fh:
        data = fh.read()
    if len(data) < _PRE.size:
        if not data.startswith(MAGIC[: len(data)]) or not data:
            raise SlicekitError(f"{name} is not a packed slicekit model (bad magic): expected a file written by "
                                "`slicekit pack`")
        raise SlicekitError(f"{name} is truncated ({len(data)} bytes): re-create it with slicekit pack")
    magic, version, head_len, pay_len, digest = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise SlicekitError(f"{name} is not a packed slicekit model (bad magic): expected a file written by "
                            "`slicekit pack`")
    if version != CONTAINER_VERSION:
        raise SlicekitError(f"{name} has container version {version}; this slicekit reads version "
                            f"{CONTAINER_VERSION} — upgrade slicekit")
    expected = _PRE.size + head_len + pay_len
    if len(data) < expected:
        raise SlicekitError(f"{name} is truncated ({len(data)} of {expected} bytes): re-create it with slicekit pack")
    if len(data) > expected:
        raise SlicekitError(f"{name} has {len(data) - expected} unexpected trailing bytes: the file is corrupt")
    view = memoryview(data)
    if hashlib.sha256(view[_PRE.size:]).digest() != digest:
        raise SlicekitError(f"{name} is corrupt (checksum mismatch): re-create it with slicekit pack")
    try:
        header = json.loads(bytes(view[_PRE.size:_PRE.size + head_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SlicekitError(f"{name} has an unreadable header ({err})") from err
    if not isinstance(header, dict) or "sections" not in header:
        raise SlicekitError(f"{name} has a malformed header")
    return Container(header, view[_PRE.size + head_len:])
