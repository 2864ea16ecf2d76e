"""Check a checkpoint's ``variables.index`` in Python before TensorFlow's reader opens it.

TensorFlow's ``CheckpointReader`` trusts the index: an entry that is not a ``BundleEntryProto``, a
negative or overflowing dimension, a slice outside its tensor, a key listed twice or a non-plain
dtype abort the whole process (CHECK failures in ``checkpoint_reader.cc``, ``tensor_shape.cc``,
``tensor.cc``) instead of raising. The index is small (one entry per variable), so graphslim reads
it first: the table format (leveldb's SSTable: data blocks, an index block, a 48-byte footer) and
every entry, and refuses what TensorFlow would crash on with a :class:`LoadError` naming the file
and the entry. Snappy-compressed blocks are not decoded (TensorFlow's bundle writer does not
compress); an index holding one is refused.
"""

from __future__ import annotations

from pathlib import Path

from graphslim.errors import LoadError

__all__ = ["check_index", "read_varint", "block_entries"]

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_MAX_DIMS = 254
_MAX_ELEMENTS = 1 << 62
# plain dtypes a checkpoint may hold: float, double, int32, uint8, int16, int8, string, complex64,
# int64, bool, qint8, quint8, qint32, bfloat16, qint16, quint16, uint16, complex128, half, uint32,
# uint64, and the float8/int4 families; not resource (20), variant (21) nor reference types (1xx)
_PLAIN = frozenset(range(1, 20)) | {22, 23} | frozenset(range(24, 32))


def read_varint(buf, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 varint at ``pos`` of ``buf`` and the position after it (ValueError when
    it runs past the end or past 64 bits)."""
    shift = value = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _block(raw: bytes, off: int, size: int) -> bytes:
    if off < 0 or size < 0 or off + size + 5 > len(raw):
        raise ValueError("a block lies outside the file")
    if raw[off + size] != 0:
        raise ValueError("a block is compressed (TensorFlow's checkpoints are not)")
    return raw[off:off + size]


def block_entries(contents: bytes):
    """The ``(key, value)`` entries of one uncompressed leveldb table block, prefix-compressed keys
    expanded (ValueError when the block is corrupt)."""
    if len(contents) < 4:
        raise ValueError("a block is too short")
    n = int.from_bytes(contents[-4:], "little")
    end = len(contents) - 4 * (n + 1)
    if n < 1 or end < 0:
        raise ValueError("a block's restart array is corrupt")
    pos, key = 0, b""
    while pos < end:
        shared, pos = read_varint(contents, pos)
        unshared, pos = read_varint(contents, pos)
        vlen, pos = read_varint(contents, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise ValueError("an entry lies outside its block")
        key = key[:shared] + contents[pos:pos + unshared]
        pos += unshared
        yield key, contents[pos:pos + vlen]
        pos += vlen


def _table(raw: bytes):
    if len(raw) < _FOOTER or int.from_bytes(raw[-8:], "little") != _MAGIC:
        raise ValueError("it is not a checkpoint index (no table footer)")
    footer = raw[-_FOOTER:]
    _, pos = read_varint(footer, 0)  # metaindex handle: unused by bundles
    _, pos = read_varint(footer, pos)
    index_off, pos = read_varint(footer, pos)
    index_size, pos = read_varint(footer, pos)
    for _, handle in block_entries(_block(raw, index_off, index_size)):
        off, p = read_varint(handle, 0)
        size, _ = read_varint(handle, p)
        yield from block_entries(_block(raw, off, size))


def _parse(proto, value: bytes, index, what: str):
    """``proto`` parsed from ``value``, or a LoadError saying ``what`` is not a valid record."""
    try:
        proto.ParseFromString(value)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise LoadError(f"{index}: {what} is not a valid record; the variables files are corrupt or "
                        "hostile.") from None
    return proto


def _check_entry(entry, name: str) -> str | None:
    if entry.dtype not in _PLAIN:
        return f"has dtype {entry.dtype}, which a checkpoint cannot hold"
    dims = [d.size for d in entry.shape.dim]
    if len(dims) > _MAX_DIMS:
        return f"has {len(dims)} dimensions"
    count = 1
    for d in dims:
        if d < 0:
            return f"has a dimension of size {d}"
        count *= d
        if count > _MAX_ELEMENTS:
            return f"has shape {dims}, more elements than any tensor can hold"
    slices = set()
    for s in entry.slices:
        text = s.SerializeToString(deterministic=True)
        if text in slices:
            return "lists the same slice twice"
        slices.add(text)
        if len(s.extent) and len(s.extent) != len(dims):
            return f"has a slice of rank {len(s.extent)} for a tensor of rank {len(dims)}"
        for extent, d in zip(s.extent, dims):
            has_length = extent.HasField("length")
            if extent.start < 0 or extent.start > d:
                return f"has a slice starting at {extent.start} in a dimension of size {d}"
            if has_length and (extent.length < 0 or extent.start + extent.length > d):
                return f"has a slice [{extent.start}, +{extent.length}) outside a dimension of size {d}"
            if not has_length and extent.start != 0:
                return f"has a slice from {extent.start} without a length"
    if entry.size < 0 or entry.offset < 0 or entry.shard_id < 0:
        return "has a negative offset, size or shard"
    return None


def check_index(index: Path) -> dict:
    """Raise :class:`LoadError` naming ``index`` and the entry when TensorFlow's reader would crash
    on it (see the module docstring); otherwise return the entries, ``{key: BundleEntryProto}``, with
    the ``BundleHeaderProto`` under the key ``""``."""
    from tensorflow.core.protobuf import tensor_bundle_pb2

    index = Path(index)
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise LoadError(f"{index}: cannot read the checkpoint index ({exc.strerror or exc}).") from None
    seen = set()
    entries = {}
    try:
        for key, value in _table(raw):
            name = key.decode("utf-8", "replace")
            if key in seen:
                raise LoadError(f"{index}: the checkpoint index lists {name!r} twice; the variables files "
                                "are corrupt or hostile. Copy the whole SavedModel directory again.")
            seen.add(key)
            if key == b"":
                header = _parse(tensor_bundle_pb2.BundleHeaderProto(), value, index, "the checkpoint header")
                if header.num_shards < 0:
                    raise LoadError(f"{index}: the checkpoint header declares {header.num_shards} shards; "
                                    "the variables files are corrupt.")
                entries[""] = header
                continue
            entry = _parse(tensor_bundle_pb2.BundleEntryProto(), value, index, f"the checkpoint entry {name!r}")
            problem = _check_entry(entry, name)
            if problem:
                raise LoadError(f"{index}: the checkpoint entry {name!r} {problem}; the variables files are "
                                "corrupt or hostile (TensorFlow's checkpoint reader would abort on it).")
            entries[name] = entry
    except ValueError as exc:
        raise LoadError(f"{index}: the checkpoint index is corrupt ({exc}); copy the whole SavedModel "
                        "directory again.") from None
    except RecursionError:
        raise LoadError(f"{index}: the checkpoint index nests too deeply; it is corrupt.") from None
    return entries
