"""TFRecord files read without TensorFlow, every record's two checksums verified.

A TFRecord file is a sequence of frames::

  uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little-endian), where ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2**32``
with ``c`` the CRC-32C (Castagnoli polynomial, reflected 0x82f63b78) of the bytes ``x``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lpwd_optax.experiments.data.dataset import DataError

_MASK_DELTA = 0xA282EAD8
_CHUNK_RECORDS = 4096  # records checksummed together: bounds the padded copy's size


def _crc32c_table() -> np.ndarray:
    """The CRC-32C of each byte value: one table row per byte of the bytewise algorithm."""
    crc = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(0x82F63B78), crc >> 1)
    return crc.astype(np.uint32)


_TABLE = _crc32c_table()
_TABLE_INTS = _TABLE.tolist()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data`, one byte at a time: for short inputs such as a frame's length."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE_INTS[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c_many(chunks: Sequence[bytes]) -> np.ndarray:
    """uint32 [len(chunks)]: the CRC-32C of each chunk, computed for all chunks at once.

    Byte position ``j`` of every chunk longer than ``j`` is folded in by one vectorized step,
    so Python loops over the longest chunk's length, not over the total size.
    """
    out = np.empty(len(chunks), np.uint32)
    for start in range(0, len(chunks), _CHUNK_RECORDS):
        part = chunks[start : start + _CHUNK_RECORDS]
        lengths = np.fromiter(map(len, part), np.int64, len(part))
        order = np.argsort(-lengths, kind="stable")  # longest first: active chunks lead
        lengths = lengths[order]
        width = int(lengths[0]) if len(part) else 0
        # columns[j, i]: byte j of the i-th longest chunk (zero past its end).
        columns = np.zeros((width, len(part)), np.uint8)
        columns.T[np.arange(width) < lengths[:, None]] = np.frombuffer(
            b"".join(part[i] for i in order), np.uint8
        )
        active = np.searchsorted(-lengths, -np.arange(width), side="left")  # lengths > j
        crc = np.full(len(part), 0xFFFFFFFF, np.uint32)
        for j in range(width):
            k = active[j]
            c = crc[:k]
            crc[:k] = _TABLE[(c ^ columns[j, :k]) & 0xFF] ^ (c >> 8)
        out[start + order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def mask(crc: int | np.ndarray) -> int | np.ndarray:
    """TFRecord's masking of a CRC (rotated right by 15 bits, plus a constant)."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        return ((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: str | os.PathLike) -> list[bytes]:
    """The records of the TFRecord file `path`.

    Raises:
      DataError: a truncated file or a record whose length or data does not match its CRC;
        the message names the file and the record's index.
    """
    data = Path(path).read_bytes()
    records, data_crcs = [], []
    pos = 0
    while pos < len(data):
        index = len(records)
        if pos + 12 > len(data):
            raise DataError(f"TFRecord file {path}: record {index} is truncated")
        length, length_crc = struct.unpack_from("<QI", data, pos)
        if mask(crc32c(data[pos : pos + 8])) != length_crc:
            raise DataError(f"TFRecord file {path}: record {index} is corrupted (length CRC)")
        end = pos + 12 + length
        if end + 4 > len(data):
            raise DataError(f"TFRecord file {path}: record {index} is truncated")
        records.append(data[pos + 12 : end])
        data_crcs.append(struct.unpack_from("<I", data, end)[0])
        pos = end + 4
    bad = np.flatnonzero(mask(crc32c_many(records)) != np.asarray(data_crcs, np.uint32))
    if len(bad):
        raise DataError(f"TFRecord file {path}: record {bad[0]} is corrupted (data CRC)")
    return records
