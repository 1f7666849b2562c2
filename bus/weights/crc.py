"""CRC-32 of weight chunks, and the whole-buffer crc32 combined from the chunk crcs.

``crc32`` is zlib's CRC-32, computed with ISA-L where the `isal` wheel is installed (~5x faster than
zlib.crc32 and bit-identical), else with zlib.

``copy_crc`` copies a chunk into its destination and returns the destination's crc32 in one pass of
256 KB blocks, each checked while it is still in the CPU cache (copy 4 MB, then read 4 MB back, goes
to memory twice: measured ~15 % slower here).

``crc32_combine`` is zlib's algorithm: crc(A‖B) = M_len(B)·crc(A) ⊕ crc(B) over GF(2), M_len the
"append len zero bytes" operator (a 32×32 bit matrix, built by repeated squaring of the one-zero-bit
operator and cached per length). ``combine_chunks`` folds it over a buffer's chunk crcs, so the
whole-buffer crc32 needs no second pass over the bytes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

try:  # ISA-L's CRC-32 (carry-less multiply) runs ~5x zlib's here; the same polynomial, the same values
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover — plain zlib where the wheel is missing
    from zlib import crc32

__all__ = ["combine_chunks", "copy_crc", "crc32", "crc32_combine"]

COPY_BLOCK = 256 << 10


def copy_crc(dest: Any, src: Any) -> int:
    """`dest[:] = src` (equal-length uint8 numpy arrays) and crc32 of `dest` as written."""
    crc = 0
    for start in range(0, len(dest), COPY_BLOCK):
        block = dest[start:start + COPY_BLOCK]
        block[:] = src[start:start + COPY_BLOCK]
        crc = crc32(block, crc)
    return crc



def _gf2_times(mat: Sequence[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_mul(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The operator "apply b, then a"."""
    return [_gf2_times(a, col) for col in b]


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """GF(2) matrix (32 columns) that advances a crc32 register over `nbytes` zero bytes."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]  # reflected CRC-32 polynomial, one zero bit
    byte = one_bit
    for _ in range(3):  # 8 zero bits = one_bit squared three times
        byte = _gf2_mul(byte, byte)
    result: list[int] | None = None
    power = byte
    while nbytes:
        if nbytes & 1:
            result = power if result is None else _gf2_mul(power, result)
        nbytes >>= 1
        if nbytes:
            power = _gf2_mul(power, power)
    return tuple(result if result is not None else [1 << n for n in range(32)])


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(A ‖ B) from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    return (_gf2_times(_zeros_operator(len2), crc1) ^ crc2) if len2 else crc1


def combine_chunks(crcs: Sequence[int], chunk_bytes: int, total_bytes: int) -> int:
    crc = 0
    for i, c in enumerate(crcs):
        crc = crc32_combine(crc, c, min(chunk_bytes, total_bytes - i * chunk_bytes))
    return crc
