"""Update codec: dense or top-k sparse tensor maps, quantized values, compact indices, optional zstd.

Wire form (msgpack, self-describing, docs/protocol.md "Tensor codec")::

    {"codec": 1, "tensors": {name: T}}                      # plain
    {"codec": 1, "zstd": bin, "size": int}                 # zstd of msgpack({name: T}), size = raw bytes

    T = {"shape": [int], "values": "float32"|"float16"|"bfloat16"|"int8"|"int4"|"sign", "data": bin,
         ["block": int, "scales": bin (fp32 per block; int8, int4 and sign only)],
         ["nnz": int, "index": "varint"|"bitmap", "indices": bin]}   # present: sparse

A sparse tensor lists ``nnz`` flat (row-major) positions in increasing order, coded either as
LEB128 varints of the gaps (``idx[i] - idx[i-1] - 1``, first from -1) or as a little-endian bitmap
of ``ceil(numel / 8)`` bytes, whichever is smaller. ``data`` holds the values in index order
(dense tensors: all ``numel`` values). int8 values are ``round(v / scale)`` with one fp32 scale
``max|v| / 127`` per block of ``block`` consecutive values, so the error of a value is at most
``scale / 2 = max|block| / 254``; fp16 and bf16 round to nearest. int4 packs two values a byte
(low nibble first, two's complement in [-8, 7]) as ``round(v / scale)`` with ``scale = max|block| / 7``:
error at most ``max|block| / 14``. int2 packs four values a byte (first in the low bits) as
``q = round(v / scale + 1.5)`` in 0..3, decoded ``(q - 1.5) * scale`` with ``scale = max|block| / 1.5``:
error at most ``max|block| / 3``. ``sign`` packs one bit a value (little-endian bit order, 1 =
positive) decoded as ``±scale`` with ``scale = mean|block|``, the L2-best one-bit code of a block:
error at most ``max|block|``. The low-bit formats are meant for use with error feedback, which
carries what they drop into the next round; Adam-trained LoRA differences have near-uniform
magnitudes (Adam normalises each coordinate), so they keep far more of a difference per byte than
top-k does.

Decoding validates every declared size against the payload and against the caller's bound on the
number of elements *before* allocating anything, so a hostile header cannot make it allocate more
than ``4 * max_elements`` bytes of output (plus the payload's own size).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.tensors import MAX_NDIM, bfloat16_bits_to_float32, float32_to_bfloat16_bits
from fedmq_protocol.wire import unpack_limited

CODEC_VERSION = 1
ValueFormat = Literal["float32", "float16", "bfloat16", "int8", "int4", "int2", "sign"]
VALUE_FORMATS: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8", "int4", "int2", "sign")
BITS_PER_VALUE = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4, "int2": 2, "sign": 1}
_BLOCK_SCALED = ("int8", "int4", "int2", "sign")


_TOP_LEVEL = {"int8": 127.0, "int4": 7.0, "int2": 1.5}  # scale = max|block| / top


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned ``bits``-bit codes, ``8 // bits`` a byte, the first in the lowest bits."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    per = 8 // bits
    c = np.append(codes.astype(np.uint8), np.zeros((-len(codes)) % per, dtype=np.uint8)).reshape(-1, per)
    out = np.zeros(len(c), dtype=np.uint8)
    for k in range(per):
        out |= c[:, k] << np.uint8(k * bits)
    return out.tobytes()


def _unpack_codes(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` codes packed by :func:`_pack_codes` (uint8)."""
    if bits == 8:
        return raw[:n]
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    return np.stack([(raw >> np.uint8(k * bits)) & mask for k in range(per)], axis=1).reshape(-1)[:n]


def _level_table(fmt: str) -> np.ndarray:
    """byte -> the ``8 // bits`` unscaled levels it packs (float32, first in the lowest bits)."""
    bits = BITS_PER_VALUE[fmt]
    codes = _unpack_codes(np.arange(256, dtype=np.uint8), bits, 256 * (8 // bits)).reshape(256, -1)
    if fmt == "int8":
        return codes.view(np.int8).astype(np.float32)
    if fmt == "int4":
        return np.where(codes >= 8, codes.astype(np.float32) - 16, codes.astype(np.float32))
    if fmt == "int2":
        return codes.astype(np.float32) - 1.5
    return codes.astype(np.float32) * 2.0 - 1.0  # sign


_LEVELS = {fmt: _level_table(fmt) for fmt in ("int8", "int4", "int2", "sign")}
_MAX_LEVEL = {fmt: float(np.abs(table).max()) for fmt, table in _LEVELS.items()}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def value_bytes(fmt: str, n: int) -> int:
    """Bytes of ``n`` values in format ``fmt`` (packed formats round up to whole bytes)."""
    return (n * BITS_PER_VALUE[fmt] + 7) // 8
MAX_VARINT_BYTES = 9  # 63-bit gaps
MAX_BLOCK = 1 << 20
MAX_TENSORS = 1 << 16


# ---------------------------------------------------------------------------------------------
# index coding
# ---------------------------------------------------------------------------------------------


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers (vectorised)."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nb = np.ones(v.shape, dtype=np.int64)
    t = v >> np.uint64(7)
    while t.any():
        nb += t > 0
        t >>= np.uint64(7)
    starts = np.cumsum(nb) - nb
    out = np.empty(int(nb.sum()), dtype=np.uint8)
    for k in range(int(nb.max())):
        sel = nb > k
        byte = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nb[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = byte | more
    return out.tobytes()


def varint_decode(buf: bytes, n: int, what: str = "indices") -> np.ndarray:
    """Exactly ``n`` LEB128 integers filling ``buf``; raises ProtocolError otherwise."""
    if len(buf) < n or len(buf) > n * MAX_VARINT_BYTES:
        raise ProtocolError(f"{what}: {len(buf)} bytes cannot hold {n} varints")
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero((b & 0x80) == 0)
    if len(ends) != n or ends[-1] != len(b) - 1:
        raise ProtocolError(f"{what}: expected {n} varints, found {len(ends)} (or a truncated last one)")
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise ProtocolError(f"{what}: a varint is longer than {MAX_VARINT_BYTES} bytes")
    out = np.zeros(n, dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        out[sel] |= (b[starts[sel] + k] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * k)
    return out


def _encode_indices(idx: np.ndarray, numel: int) -> tuple[str, bytes]:
    gaps = np.diff(idx, prepend=-1) - 1
    varint = varint_encode(gaps)
    bitmap_len = (numel + 7) // 8
    if bitmap_len < len(varint):
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        return "bitmap", np.packbits(mask, bitorder="little").tobytes()
    return "varint", varint


def _decode_indices(kind: Any, buf: bytes, nnz: int, numel: int, where: str) -> np.ndarray:
    if kind == "varint":
        gaps = varint_decode(buf, nnz, where)
        if nnz and int(gaps.max()) >= numel:
            raise ProtocolError(f"{where}: index gap beyond the tensor's {numel} elements")
        idx = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
        # each step adds < numel + 1, so a uint64 wrap-around would show as a decrease
        if nnz and (int(idx[-1]) >= numel or (nnz > 1 and not np.all(np.diff(idx) > 0))):
            raise ProtocolError(f"{where}: indices run past the tensor's {numel} elements")
        out: np.ndarray = idx.astype(np.int64)
        return out
    if kind == "bitmap":
        if len(buf) != (numel + 7) // 8:
            raise ProtocolError(f"{where}: bitmap is {len(buf)} bytes, {numel} elements need {(numel + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise ProtocolError(f"{where}: bitmap has bits set past the tensor's end")
        marked = np.flatnonzero(bits[:numel])
        if len(marked) != nnz:
            raise ProtocolError(f"{where}: bitmap marks {len(marked)} entries, header says nnz={nnz}")
        return marked.astype(np.int64)
    raise ProtocolError(f"{where}: unknown index coding {kind!r}")


# ---------------------------------------------------------------------------------------------
# value coding
# ---------------------------------------------------------------------------------------------


def _encode_values(vals: np.ndarray, fmt: str, block: int) -> dict[str, Any]:
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    if fmt == "float32":
        return {"data": vals.astype("<f4").tobytes()}
    if fmt == "float16":
        return {"data": vals.astype("<f2").tobytes()}
    if fmt == "bfloat16":
        return {"data": float32_to_bfloat16_bits(vals).astype("<u2").tobytes()}
    if fmt in _BLOCK_SCALED:
        n = len(vals)
        nblocks = (n + block - 1) // block
        padded = np.zeros(nblocks * block, dtype=np.float32)
        padded[:n] = vals
        blocks = padded.reshape(nblocks, block)
        if fmt == "sign":
            # mean |v| over the block's real values (padding excluded): the L2-optimal magnitude
            counts = np.full(nblocks, block, dtype=np.float32)
            if nblocks:
                counts[-1] = n - (nblocks - 1) * block
            scales = (np.abs(blocks).sum(axis=1) / counts).astype(np.float32)
            codes = (vals >= 0).astype(np.uint8)
        else:
            top = _TOP_LEVEL[fmt]
            scales = (np.abs(blocks).max(axis=1) / np.float32(top)).astype(np.float32)
            safe = np.where(scales > 0, scales, np.float32(1.0))
            x = (blocks / safe[:, None]).reshape(-1)[:n]
            if fmt == "int2":
                # four levels (q - 1.5) * scale, q in 0..3: no zero level, which suits differences
                # whose entries all moved (Adam) better than {-1, 0, 1}
                codes = np.clip(np.rint(x + 1.5), 0, 3).astype(np.uint8)
            else:
                q = np.clip(np.rint(x), -top, top).astype(np.int8)
                codes = q.view(np.uint8) & np.uint8(0xFF if fmt == "int8" else 0x0F)  # two's complement
        data = _pack_codes(codes, BITS_PER_VALUE[fmt])
        return {"data": data, "block": block, "scales": scales.astype("<f4").tobytes()}
    raise ValueError(f"unknown value format {fmt!r}; valid: {', '.join(VALUE_FORMATS)}")


def _decode_values(t: Mapping[str, Any], fmt: str, n: int, where: str) -> np.ndarray:
    data = t["data"]
    if len(data) != value_bytes(fmt, n):
        raise ProtocolError(f"{where}: {len(data)} value bytes, {n} {fmt} values need {value_bytes(fmt, n)}")
    if fmt == "float32":
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt == "float16":
        out = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif fmt == "bfloat16":
        out = bfloat16_bits_to_float32(np.frombuffer(data, dtype="<u2"))
    else:
        block, scales = t.get("block"), t.get("scales")
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
            raise ProtocolError(f"{where}: {fmt} values need an integer block in [1, {MAX_BLOCK}]")
        if not isinstance(scales, (bytes, bytearray)):
            raise ProtocolError(f"{where}: {fmt} values need fp32 scales")
        nblocks = (n + block - 1) // block
        if len(scales) != 4 * nblocks:
            raise ProtocolError(f"{where}: {len(scales)} scale bytes, {nblocks} blocks need {4 * nblocks}")
        s = np.frombuffer(scales, dtype="<f4")
        if s.size and not (np.isfinite(s).all() and s.min() >= 0):
            raise ProtocolError(f"{where}: {fmt} scales must be finite and >= 0")
        if s.size and float(s.max()) * _MAX_LEVEL[fmt] > _FLOAT32_MAX:
            raise ProtocolError(f"{where}: non-finite values")  # level x scale would overflow float32
        # one table lookup turns each byte into its levels, then each block is scaled in place
        q = _LEVELS[fmt][np.frombuffer(data, dtype=np.uint8)].reshape(-1)[:n]
        whole = (n // block) * block
        q[:whole].reshape(-1, block).__imul__(s[: n // block, None])
        if whole < n:
            q[whole:] *= s[-1]
        return q  # finite: finite levels times scales checked above
    if not np.isfinite(out).all():
        raise ProtocolError(f"{where}: non-finite values")
    return out


# ---------------------------------------------------------------------------------------------
# the encoded map
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedTensor:
    """A decoded tensor: dense (``indices`` None, ``values`` all elements) or sparse."""

    shape: tuple[int, ...]
    values: np.ndarray  # float32, flat
    indices: np.ndarray | None = None  # int64 flat positions, increasing

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self) -> np.ndarray:
        if self.indices is None:
            return self.values.reshape(self.shape)
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def add_into(self, flat_acc: np.ndarray, weight: float = 1.0) -> None:
        """``flat_acc += weight * self`` without densifying a sparse tensor (indices are unique)."""
        if self.indices is None:
            flat_acc += weight * self.values.astype(flat_acc.dtype)
        else:
            flat_acc[self.indices] += weight * self.values.astype(flat_acc.dtype)


@dataclass(frozen=True)
class EncodedTensors:
    """The wire object of a tensor map, validated as a structure but not yet decoded."""

    obj: dict[str, Any]

    @property
    def empty(self) -> bool:
        return "tensors" in self.obj and not self.obj["tensors"]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """As a message field: validated with :meth:`from_wire` (or encoded losslessly when code
        builds the message from a plain name -> array map) and written back with :meth:`to_wire`."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls._from_field, serialization=core_schema.plain_serializer_function_ser_schema(cls.to_wire))

    @classmethod
    def _from_field(cls, v: Any) -> EncodedTensors:
        if (isinstance(v, Mapping) and "codec" not in v
                and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in v.values())):
            return encode(v)  # built in code from arrays; a wire map always names its codec
        return cls.from_wire(v)

    @classmethod
    def from_wire(cls, obj: Any, where: str = "tensors") -> EncodedTensors:
        if isinstance(obj, EncodedTensors):
            return obj
        if not isinstance(obj, Mapping):
            raise ProtocolError(f"{where}: expected a codec map, got {type(obj).__name__}")
        if obj.get("codec") != CODEC_VERSION:
            raise ProtocolError(
                f"{where}: unsupported codec version {obj.get('codec')!r} (this build: {CODEC_VERSION})")
        keys = set(obj)
        if keys == {"codec", "tensors"}:
            if not isinstance(obj["tensors"], Mapping):
                raise ProtocolError(f"{where}.tensors: expected a map")
        elif keys == {"codec", "zstd", "size"}:
            if not isinstance(obj["zstd"], (bytes, bytearray)) or not isinstance(obj["size"], int) or obj["size"] < 0:
                raise ProtocolError(f"{where}: zstd needs raw bytes and a non-negative size")
        else:
            raise ProtocolError(f"{where}: unexpected fields {sorted(map(str, keys))}")
        return cls(dict(obj))

    def to_wire(self) -> dict[str, Any]:
        return self.obj

    def nbytes(self) -> int:
        return len(msgpack.packb(self.obj, use_bin_type=True))

    def _tensor_map(self, max_raw_bytes: int, where: str) -> Mapping[str, Any]:
        if "tensors" in self.obj:
            tensors: Mapping[str, Any] = self.obj["tensors"]
            return tensors
        size = self.obj["size"]
        if size > max_raw_bytes:
            raise ProtocolError(f"{where}: declares {size} uncompressed bytes, limit {max_raw_bytes}")
        try:
            import zstandard
        except ImportError:  # pragma: no cover - zstandard is a dependency
            raise ProtocolError(f"{where}: zstd payload but the zstandard package is missing") from None
        try:
            # a stream read never allocates more than size + 1, whatever the frame header claims
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(self.obj["zstd"])).read(size + 1)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"{where}: invalid zstd data ({exc})") from None
        if len(raw) != size:
            held = f"{len(raw)}{'+' if len(raw) > size else ''}"
            raise ProtocolError(f"{where}: zstd data holds {held} bytes, header says {size}")
        inner = unpack_limited(raw, size, what=f"{where}: zstd content")
        if not isinstance(inner, Mapping):
            raise ProtocolError(f"{where}: zstd content is not a map")
        return inner

    def decode(
        self,
        *,
        max_elements: int,
        expected: Mapping[str, tuple[int, ...]] | None = None,
        where: str = "tensors",
    ) -> dict[str, DecodedTensor]:
        """Decode every tensor. ``max_elements`` bounds the total declared element count (output
        is ``4 * max_elements`` bytes at most); ``expected`` (name -> shape), when given, must match
        exactly. All headers are checked before any tensor is allocated."""
        tmap = self._tensor_map(16 * max_elements + (1 << 16), where)
        if len(tmap) > MAX_TENSORS:
            raise ProtocolError(f"{where}: {len(tmap)} tensors, limit {MAX_TENSORS}")
        if expected is not None and set(tmap) != set(expected):
            missing, extra = sorted(set(expected) - set(tmap))[:3], sorted(map(str, set(tmap) - set(expected)))[:3]
            raise ProtocolError(f"{where}: tensor names do not match (missing {missing}, unknown {extra})")
        plans = []
        total = 0
        for name, t in tmap.items():
            w = f"{where}[{name!r}]"
            if not isinstance(name, str) or not name or len(name) > 512:
                raise ProtocolError(f"{where}: invalid tensor name {name!r}")
            shape, fmt, nnz, numel = _check_header(t, w)
            if expected is not None and tuple(expected[name]) != shape:
                raise ProtocolError(f"{w}: shape {list(shape)}, expected {list(expected[name])}")
            total += numel
            if total > max_elements:
                raise ProtocolError(f"{where}: declares more than {max_elements} elements in total")
            plans.append((name, t, w, shape, fmt, nnz, numel))
        out: dict[str, DecodedTensor] = {}
        for name, t, w, shape, fmt, nnz, numel in plans:
            if nnz is None:
                out[name] = DecodedTensor(shape, _decode_values(t, fmt, numel, w))
            else:
                idx = _decode_indices(t.get("index"), t.get("indices"), nnz, numel, w)
                out[name] = DecodedTensor(shape, _decode_values(t, fmt, nnz, w), idx)
        return out

    def decode_dense(self, **kw: Any) -> dict[str, np.ndarray]:
        return {k: v.dense() for k, v in self.decode(**kw).items()}


def _check_header(t: Any, w: str) -> tuple[tuple[int, ...], str, int | None, int]:
    """Shape/format/sizes of one tensor, checked against its own byte fields (no allocation)."""
    if not isinstance(t, Mapping):
        raise ProtocolError(f"{w}: expected a map")
    allowed = {"shape", "values", "data", "block", "scales", "nnz", "index", "indices"}
    unknown = set(t) - allowed
    if unknown:
        raise ProtocolError(f"{w}: unknown fields {sorted(map(str, unknown))}")
    shape = t.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 40) for d in shape
    ):
        raise ProtocolError(f"{w}: invalid shape {shape!r}")
    shape = tuple(shape)
    fmt = t.get("values")
    if not isinstance(fmt, str) or fmt not in BITS_PER_VALUE:
        raise ProtocolError(f"{w}: unknown value format {fmt!r}")
    if not isinstance(t.get("data"), (bytes, bytearray)):
        raise ProtocolError(f"{w}: data must be raw bytes")
    numel = math.prod(shape)
    if numel > (1 << 40):
        raise ProtocolError(f"{w}: shape {list(shape)} is too large")
    nnz = t.get("nnz")
    if nnz is not None:
        if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= numel:
            raise ProtocolError(f"{w}: nnz {nnz!r} outside [0, {numel}]")
        if not isinstance(t.get("indices"), (bytes, bytearray)):
            raise ProtocolError(f"{w}: sparse tensor needs raw index bytes")
        n_vals = nnz
    else:
        if "indices" in t or "index" in t:
            raise ProtocolError(f"{w}: indices without nnz")
        n_vals = numel
    if len(t["data"]) != value_bytes(fmt, n_vals):
        raise ProtocolError(f"{w}: {len(t['data'])} value bytes, {n_vals} {fmt} values need {value_bytes(fmt, n_vals)}")
    return shape, fmt, nnz, numel


# ---------------------------------------------------------------------------------------------
# encoding: selection (top-k), quantization, index choice
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSpec:
    """How to encode a tensor map.

    ``density`` 1.0 sends every element (``auto_sparse`` still lists only nonzero entries when that
    is smaller: exact); below 1.0 keeps the ``density`` share of largest-magnitude entries, chosen
    across the whole map (``topk="global"``) or within each tensor (``"per_tensor"``).
    """

    values: str = "float32"
    density: float = 1.0
    topk: str = "global"
    block: int = 64
    zstd: bool = False
    zstd_level: int = 3
    auto_sparse: bool = True

    def __post_init__(self) -> None:
        if self.values not in VALUE_FORMATS:
            raise ValueError(f"values must be one of {VALUE_FORMATS}, got {self.values!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.topk not in ("global", "per_tensor"):
            raise ValueError(f"topk must be 'global' or 'per_tensor', got {self.topk!r}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block must be in [1, {MAX_BLOCK}]")


def _encode_one(arr: np.ndarray, idx: np.ndarray | None, spec: CodecSpec) -> dict[str, Any]:
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    t: dict[str, Any] = {"shape": [int(d) for d in arr.shape], "values": spec.values}
    if idx is None:
        t.update(_encode_values(flat, spec.values, spec.block))
        return t
    idx = np.sort(idx.astype(np.int64))
    kind, ibytes = _encode_indices(idx, flat.size)
    t.update(_encode_values(flat[idx], spec.values, spec.block))
    t.update({"nnz": int(idx.size), "index": kind, "indices": ibytes})
    return t


def _wrap(tmap: dict[str, Any], spec: CodecSpec) -> EncodedTensors:
    if not spec.zstd:
        return EncodedTensors({"codec": CODEC_VERSION, "tensors": tmap})
    import zstandard

    raw = msgpack.packb(tmap, use_bin_type=True)
    comp = zstandard.ZstdCompressor(level=spec.zstd_level).compress(raw)
    return EncodedTensors({"codec": CODEC_VERSION, "zstd": comp, "size": len(raw)})


def _global_order(arrays: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = list(arrays)
    sizes = np.array([arrays[n].size for n in names], dtype=np.int64)
    mags = (np.concatenate([np.abs(np.asarray(arrays[n], dtype=np.float32)).reshape(-1) for n in names])
            if names else np.zeros(0, np.float32))
    # stable descending sort: ties broken by position, so selection is deterministic
    order = np.argsort(-mags, kind="stable")
    return names, np.concatenate([[0], np.cumsum(sizes)]), order


def _split(order_k: np.ndarray, names: list[str], offsets: np.ndarray) -> dict[str, np.ndarray]:
    which = np.searchsorted(offsets, order_k, side="right") - 1
    return {n: order_k[which == i] - offsets[i] for i, n in enumerate(names)}


def encode(arrays: Mapping[str, np.ndarray], spec: CodecSpec = CodecSpec()) -> EncodedTensors:
    """Encode float arrays under ``spec`` (see :class:`CodecSpec`)."""
    tmap: dict[str, Any] = {}
    if spec.density >= 1.0:
        for name, arr in arrays.items():
            flat = np.asarray(arr, dtype=np.float32).reshape(-1)
            dense = _encode_one(arr, None, spec)
            if spec.auto_sparse:
                nz = np.flatnonzero(flat)
                if nz.size < flat.size:
                    sparse = _encode_one(arr, nz, spec)
                    if _tensor_bytes(sparse) < _tensor_bytes(dense):
                        dense = sparse
            tmap[name] = dense
        return _wrap(tmap, spec)
    if spec.topk == "per_tensor":
        for name, arr in arrays.items():
            flat = np.abs(np.asarray(arr, dtype=np.float32).reshape(-1))
            k = max(1, round(spec.density * flat.size)) if flat.size else 0
            idx = np.argsort(-flat, kind="stable")[:k]
            tmap[name] = _encode_one(arr, idx, spec)
        return _wrap(tmap, spec)
    names, offsets, order = _global_order(arrays)
    k = max(1, round(spec.density * order.size)) if order.size else 0
    return _encode_topk(arrays, names, offsets, order[:k], spec)


def _encode_topk(arrays: Mapping[str, np.ndarray], names: list[str], offsets: np.ndarray, order_k: np.ndarray,
                 spec: CodecSpec) -> EncodedTensors:
    parts = _split(order_k, names, offsets)
    return _wrap({n: _encode_one(arrays[n], parts[n], spec) for n in names}, spec)


def _tensor_bytes(t: dict[str, Any]) -> int:
    return sum(len(v) for v in t.values() if isinstance(v, (bytes, bytearray)))


def max_abs_error(values: np.ndarray, fmt: str, block: int = 64) -> np.ndarray:
    """The stated per-element bound of the value format (0 for float32)."""
    v = np.abs(np.asarray(values, dtype=np.float32).reshape(-1))
    if fmt == "float32":
        return np.zeros_like(v)
    if fmt == "float16":
        return np.maximum(v * 2.0**-11, 2.0**-25)  # half ulp, subnormal floor
    if fmt == "bfloat16":
        return v * 2.0**-8
    n = v.size
    nblocks = (n + block - 1) // block
    padded = np.zeros(nblocks * block, dtype=np.float32)
    padded[:n] = v
    bmax = padded.reshape(nblocks, block).max(axis=1)
    share = {"int8": 1 / 254.0, "int4": 1 / 14.0, "int2": 1 / 3.0, "sign": 1.0}[fmt]
    return np.repeat(bmax * share * (1 + 1e-5), block)[:n]


# ---------------------------------------------------------------------------------------------
# byte budget
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetChoice:
    encoded: EncodedTensors
    spec: CodecSpec
    nbytes: int  # as measured by the caller's size function
    sq_error: float  # squared L2 error of what the encoding drops


def fit_budget(
    arrays: Mapping[str, np.ndarray],
    budget: int,
    size_of: Callable[[EncodedTensors], int],
    *,
    topk: str = "global",
    block: int = 64,
    zstd: bool = False,
    formats: tuple[str, ...] = ("float32", "float16", "int8", "int4", "int2", "sign"),
) -> BudgetChoice:
    """The encoding of ``arrays`` whose ``size_of`` fits ``budget`` with the least squared error.

    Candidates: dense in each of ``formats``, and for each 16-bit/8-bit format the largest top-k
    that fits (binary search on k over one magnitude ordering). Raises ValueError when not even
    one entry fits.
    """
    names, offsets, order = _global_order(arrays)
    flat = (np.concatenate([np.asarray(arrays[n], dtype=np.float32).reshape(-1) for n in names])
            if names else np.zeros(0, np.float32))
    n_total = max(1, flat.size)
    best: BudgetChoice | None = None

    def error(enc: EncodedTensors) -> float:
        dec = enc.decode(max_elements=n_total)
        return sum(float(np.sum((np.asarray(arrays[n], np.float32).reshape(-1).astype(np.float64)
                                 - dec[n].dense().reshape(-1)) ** 2)) for n in names)

    def consider(enc: EncodedTensors, spec: CodecSpec) -> None:
        nonlocal best
        size = size_of(enc)
        if size > budget:
            return
        err = error(enc)
        if best is None or err < best.sq_error or (err == best.sq_error and size < best.nbytes):
            best = BudgetChoice(enc, spec, size, err)

    for fmt in formats:
        spec = CodecSpec(values=fmt, density=1.0, topk=topk, block=block, zstd=zstd)
        consider(encode(arrays, spec), spec)
        if best is not None and best.sq_error == 0.0:
            return best
    per_tensor = topk == "per_tensor"

    def build(fmt: str, k: int) -> EncodedTensors:
        if per_tensor:
            return encode(arrays, CodecSpec(values=fmt, density=k / n_total, topk=topk, block=block, zstd=zstd))
        return _encode_topk(arrays, names, offsets, order[:k], CodecSpec(values=fmt, topk=topk, block=block, zstd=zstd))

    for fmt in formats:
        if fmt == "float32" and "float16" in formats:
            continue  # at equal bytes fp16 keeps twice the entries; its rounding is far below top-k's loss
        lo, hi = 0, flat.size  # lo: largest k known to fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size_of(build(fmt, mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo >= 1:
            consider(build(fmt, lo), CodecSpec(values=fmt, density=lo / n_total, topk=topk, block=block, zstd=zstd))
    if best is None:
        raise ValueError(f"no encoding of the update fits {budget} bytes (raise uplink_budget_bytes)")
    return best
