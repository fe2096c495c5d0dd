"""Read a TensorFlow (V2 bundle) checkpoint into numpy arrays without TensorFlow.

Why this exists: the musicnn wheel ships its weights only as TF1 checkpoints
(``.index`` + ``.data-00000-of-00001``), and no library reads that format
without importing TensorFlow (a ~500 MB dependency we do not want at run time).
The format is small and stable:

- ``.index`` is a LevelDB-style SSTable: data blocks of prefix-compressed
  ``key -> value`` entries, an index block pointing at them, and a 48-byte
  footer. Keys are tensor names; each value is a serialized ``BundleEntryProto``
  (dtype, shape, shard, offset, size, crc32c). The empty key holds the
  ``BundleHeaderProto``, which we skip.
- ``.data-0000i-of-0000n`` holds the raw little-endian tensor bytes at the
  offsets given in the index.

Only what TF actually writes is supported: uncompressed blocks, numeric dtypes,
unsliced tensors. Anything else raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c

# tensorflow/core/framework/types.proto DataType -> numpy dtype
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}


class CheckpointError(ValueError):
    """The checkpoint files are missing, truncated, or not a TF V2 bundle."""


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    # Pure Python; only used on the small index blocks (a few KB).
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("varint runs past the end of the buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("protobuf field runs past the end of the message")
        yield field, wire, value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, _, value in _proto_fields(buf):
        if field == 2:  # TensorShapeProto.dim
            size = 0
            for f, _, v in _proto_fields(value):
                if f == 1:
                    size = v
            dims.append(size)
        elif field == 3 and value:  # unknown_rank
            raise ValueError("tensor with unknown rank")
    return tuple(dims)


def _parse_entry(buf: bytes) -> _Entry:
    dtype, shape, shard_id, offset, size = 0, (), 0, 0, 0
    for field, _, value in _proto_fields(buf):
        if field == 1:
            dtype = value
        elif field == 2:
            shape = _parse_shape(value)
        elif field == 3:
            shard_id = value
        elif field == 4:
            offset = value
        elif field == 5:
            size = value
        elif field == 7:
            raise ValueError("sliced (partitioned) tensors are not supported")
    return _Entry(dtype, shape, shard_id, offset, size)


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data):
        raise ValueError("block runs past the end of the file (truncated?)")
    block = data[offset:end]
    compression = data[end]
    if compression != 0:
        raise ValueError(f"compressed block (type {compression}) is not supported")
    (masked,) = struct.unpack_from("<I", data, end + 1)
    if _crc32c(data[offset : end + 1]) != _unmask_crc(masked):
        raise ValueError("block checksum mismatch (corrupt file)")
    return block


def _block_entries(block: bytes):
    """Yield (key, value) of one SSTable block (keys are prefix-compressed)."""
    if len(block) < 4:
        raise ValueError("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError("bad restart count")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        value = block[pos : pos + value_len]
        pos += value_len
        if pos > limit:
            raise ValueError("block entry runs past the block")
        yield key, value


def _read_index(index_path: Path) -> dict[str, _Entry]:
    data = index_path.read_bytes()
    if len(data) < _FOOTER_SIZE:
        raise ValueError("file shorter than an SSTable footer")
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, 40)
    if magic != _TABLE_MAGIC:
        raise ValueError("bad SSTable magic number (not a TF checkpoint index, or truncated)")
    _, pos = _varint(footer, 0)  # metaindex handle offset (unused)
    _, pos = _varint(footer, pos)  # metaindex handle size
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    entries: dict[str, _Entry] = {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size)):
        block_offset, p = _varint(handle, 0)
        block_size, _ = _varint(handle, p)
        for key, value in _block_entries(_read_block(data, block_offset, block_size)):
            if key == b"":  # BundleHeaderProto
                continue
            entries[key.decode("utf-8")] = _parse_entry(value)
    return entries


def read_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """Return ``{variable name: array}`` for the TF checkpoint at ``prefix``.

    ``prefix`` is the path without the ``.index`` suffix (for musicnn's
    checkpoints the file names are bare ``.index``, so the prefix is
    ``<dir>/``). Raises ``CheckpointError`` naming the bad file.
    """
    prefix = str(prefix)
    index_path = Path(prefix + ".index")
    if not index_path.is_file():
        raise CheckpointError(f"TF checkpoint index not found: {index_path}")
    try:
        entries = _read_index(index_path)
    except (ValueError, IndexError, struct.error) as err:
        raise CheckpointError(f"cannot read TF checkpoint index {index_path}: {err}") from err
    num_shards = max((e.shard_id for e in entries.values()), default=0) + 1
    shards: dict[int, bytes] = {}
    out: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        shard_path = Path(f"{prefix}.data-{entry.shard_id:05d}-of-{num_shards:05d}")
        if entry.shard_id not in shards:
            if not shard_path.is_file():
                raise CheckpointError(f"TF checkpoint data file not found: {shard_path}")
            shards[entry.shard_id] = shard_path.read_bytes()
        data = shards[entry.shard_id]
        dtype = _DTYPES.get(entry.dtype)
        if dtype is None:
            # e.g. DT_STRING; musicnn's checkpoints hold none, skip rather than fail.
            continue
        expected = int(np.prod(entry.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if entry.size != expected:
            raise CheckpointError(
                f"{shard_path}: tensor {name!r} has {entry.size} bytes, shape {entry.shape} needs {expected}"
            )
        if entry.offset + entry.size > len(data):
            raise CheckpointError(
                f"{shard_path} is truncated: tensor {name!r} ends at byte {entry.offset + entry.size}, "
                f"file has {len(data)}"
            )
        little_endian = np.dtype(dtype).newbyteorder("<")
        array = np.frombuffer(data, dtype=little_endian, count=expected // little_endian.itemsize, offset=entry.offset)
        out[name] = array.reshape(entry.shape).copy()
    return out
