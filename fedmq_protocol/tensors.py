"""bfloat16 on the wire, and the tensor limits the codec checks (``fedmq_protocol.codec``).

numpy has no bfloat16, so bf16 travels as its raw 16-bit patterns and is widened to
float32 on decode (exact: bf16 is the top half of an fp32).
"""

from __future__ import annotations

import numpy as np

MAX_NDIM = 8


def float32_to_bfloat16_bits(arr: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out: np.ndarray = ((bits + rounding) >> 16).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
