"""Tensors on the wire: raw little-endian bytes with dtype and shape. Never pickle.

numpy has no bfloat16, so bf16 travels as its raw 16-bit patterns and is widened to
float32 on decode (exact: bf16 is the top half of an fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmq_protocol.errors import ProtocolError

# wire dtype name -> (numpy storage dtype, bytes per element)
_STORAGE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_NDIM = 8


def float32_to_bfloat16_bits(arr: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class WireTensor:
    """One tensor as it travels: ``data`` holds ``prod(shape)`` little-endian elements."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in _STORAGE:
            raise ProtocolError(f"unsupported tensor dtype {self.dtype!r}")
        if len(self.shape) > MAX_NDIM or any(
            (not isinstance(d, int)) or d < 0 for d in self.shape
        ):
            raise ProtocolError(f"invalid tensor shape {self.shape!r}")
        expected = math.prod(self.shape) * _STORAGE[self.dtype].itemsize
        if len(self.data) != expected:
            raise ProtocolError(
                f"tensor data is {len(self.data)} bytes, dtype {self.dtype} shape "
                f"{list(self.shape)} needs {expected}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_numpy(cls, arr: np.ndarray, dtype: str | None = None) -> "WireTensor":
        """Encode ``arr``; ``dtype`` converts first (e.g. "bfloat16" from a float32 array)."""
        dtype = dtype or _numpy_to_wire_name(arr.dtype)
        if dtype == "bfloat16":
            stored = float32_to_bfloat16_bits(arr)
        else:
            stored = np.ascontiguousarray(arr, dtype=_STORAGE[dtype])
        return cls(dtype=dtype, shape=tuple(int(d) for d in arr.shape), data=stored.tobytes())

    def to_numpy(self) -> np.ndarray:
        """Decode to numpy; bfloat16 is widened to float32. The result is writable."""
        stored = np.frombuffer(self.data, dtype=_STORAGE[self.dtype]).reshape(self.shape)
        if self.dtype == "bfloat16":
            return bfloat16_bits_to_float32(stored)
        return stored.copy()

    def to_float32(self) -> np.ndarray:
        arr = self.to_numpy()
        if self.dtype not in FLOAT_DTYPES:
            raise ProtocolError(f"tensor dtype {self.dtype} is not a floating type")
        return arr.astype(np.float32, copy=False)

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "tensor") -> "WireTensor":
        if not isinstance(obj, Mapping):
            raise ProtocolError(f"{where}: expected a map, got {type(obj).__name__}")
        missing = {"dtype", "shape", "data"} - set(obj)
        if missing:
            raise ProtocolError(f"{where}: missing field(s) {sorted(missing)}")
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        if not isinstance(dtype, str):
            raise ProtocolError(f"{where}.dtype: expected a string")
        if not isinstance(shape, (list, tuple)):
            raise ProtocolError(f"{where}.shape: expected a list of ints")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{where}.data: expected raw bytes")
        try:
            return cls(dtype=dtype, shape=tuple(shape), data=bytes(data))
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc}") from None


def _numpy_to_wire_name(dt: np.dtype) -> str:
    for name, storage in _STORAGE.items():
        if name != "bfloat16" and np.dtype(dt).newbyteorder("<") == storage.newbyteorder("<"):
            return name
    raise ProtocolError(f"numpy dtype {dt} has no wire encoding")


TensorMap = dict[str, WireTensor]


def encode_tensor_map(tensors: Mapping[str, np.ndarray | WireTensor], dtype: str | None = None) -> dict:
    out = {}
    for name, t in tensors.items():
        wt = t if isinstance(t, WireTensor) else WireTensor.from_numpy(t, dtype)
        out[name] = wt.to_wire()
    return out


def decode_tensor_map(obj: Any, where: str = "tensors") -> TensorMap:
    if not isinstance(obj, Mapping):
        raise ProtocolError(f"{where}: expected a map of name -> tensor")
    out: TensorMap = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not name or len(name) > 512:
            raise ProtocolError(f"{where}: invalid tensor name {name!r}")
        out[name] = WireTensor.from_wire(t, f"{where}[{name!r}]")
    return out
