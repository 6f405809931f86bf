"""Seeded payload mutation for the fuzz tests (tests/test_fuzz_inputs.py): valid protocol payloads
and fast mutators (byte flips, truncations, splices, msgpack-tree edits), plus mutations that are
invalid by construction (for a live coordinator: each is refused whatever its signature)."""

from __future__ import annotations

import copy
import math
import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from fedmq_protocol.codec import CodecSpec, encode, varint_encode
from fedmq_protocol.modes.zo import ZoLedgerRound, ZoSpec, ZoUpdate

NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, -0.0, float("nan"), float("inf"),
    -float("inf"), 1e308, "", "x" * 300, "r1-fit-v0-a0", "dev-1", b"", b"\x00" * 17, b"\xff" * 64, [], {},
    [1, 2, 3], {"a": 1}, {"codec": 1, "tensors": {}}, [[[[[]]]]],
    {"shape": [2**40, 2**40], "values": "float32", "data": b""},
]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _nodes(v, (*path, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _mutate_leaf(rng: random.Random, v: Any) -> Any:
    r = rng.random()
    if isinstance(v, (bytes, bytearray)) and v and r < 0.6:
        b = bytearray(v)
        op = rng.randrange(4)
        if op == 0:
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            b = b[:rng.randrange(len(b))]
        elif op == 2:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        else:  # a NaN / Inf float32 somewhere
            if len(b) >= 4:
                i = rng.randrange(len(b) // 4) * 4
                b[i:i + 4] = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf]))
        return bytes(b)
    if isinstance(v, bool) or r < 0.5:
        return copy.deepcopy(rng.choice(NASTY))
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, -v, v * 1000, 2**63, 2**64 - 1])
    if isinstance(v, float):
        return rng.choice([math.nan, math.inf, -v, v * 1e30])
    if isinstance(v, str):
        return rng.choice([v + "x", v[:-1], "", v.upper(), "é" * 10])
    return copy.deepcopy(rng.choice(NASTY))


def tree_mutate(rng: random.Random, obj: Any) -> Any:
    """One to three edits of a msgpack tree: replace a node, delete or add a key, grow a list."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(obj)
        path = rng.choice(nodes)
        if not path:
            if rng.random() < 0.2:
                return copy.deepcopy(rng.choice(NASTY))
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        op = rng.random()
        if isinstance(parent, dict) and op < 0.15:
            del parent[key]
        elif isinstance(parent, dict) and op < 0.25:
            value = copy.deepcopy(rng.choice(NASTY))  # drawn before the key, so seeded cases stay the same
            parent[rng.choice(["extra", "schema", "kind", "nnz", "index", "zstd", "size", key + "_"])] = value
        elif isinstance(parent, list) and op < 0.25:
            parent.append(copy.deepcopy(rng.choice(NASTY)))
        else:
            parent[key] = _mutate_leaf(rng, parent[key])
    return obj


def byte_mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.random()
    if op < 0.45:
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    elif op < 0.65:
        b = b[:rng.randrange(len(b))]
    elif op < 0.8:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op < 0.9:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        del b[i:j]
    else:  # a length header claiming the maximum (bin32 / array32 / map32 markers)
        i = rng.randrange(len(b))
        b[i:i + 5] = bytes([rng.choice([0xC6, 0xDD, 0xDF, 0xDB])]) + b"\xff\xff\xff\xff"
    return bytes(b)


def mutate(rng: random.Random, data: bytes, obj: Any | None) -> bytes:
    if obj is not None and rng.random() < 0.45:
        try:
            return pack(tree_mutate(rng, obj))
        except (OverflowError, ValueError, TypeError):  # e.g. an int msgpack cannot hold
            pass
    return byte_mutate(rng, data)


HANDCRAFTED: list[bytes] = [
    b"", b"\xc0", b"\x91" * 100_000 + b"\x00", b"\x81\xa1a" * 50_000 + b"\x00",  # deep nesting
    b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",  # huge declared lengths
    b"\xc7\x01\x00\x00", b"\xd4\x01\x00",  # ext types
    pack({"schema": 1}), pack([1, 2, 3]), pack("x"), pack({1: 2}), pack({b"kind": "fit"}),
]


# ------------------------------------------------------------------------------- valid seeds

def shapes_of(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def encodings(delta: dict[str, np.ndarray]) -> list[Any]:
    """The same difference in every codec variant (dense, sparse varint/bitmap, fp16/bf16/int8, zstd)."""
    specs = [CodecSpec(), CodecSpec(values="int8", density=0.2), CodecSpec(values="float16", density=0.7),
             CodecSpec(values="bfloat16", topk="per_tensor", density=0.4),
             CodecSpec(values="int8", density=0.5, zstd=True), CodecSpec(values="float32", density=0.05, zstd=True)]
    return [encode(delta, s) for s in specs]


def zo_update() -> ZoUpdate:
    idx = np.array([1, 5, 9], dtype="<u2").tobytes()
    return ZoUpdate(base_fingerprint="f" * 16, indices=idx, g=np.array([0.5, -1, 2], dtype="<f4").tobytes())


def ledger() -> ZoLedgerRound:
    return ZoLedgerRound(round=1, spec=ZoSpec(num_seeds=64), indices=np.array([1, 3], "<u2").tobytes(),
                         g=np.array([0.1, 0.2], "<f4").tobytes(), num_clients=2, num_samples=20)


# --------------------------------------------------------------- invalid-by-construction updates

def _tensor(o: dict, rng: random.Random) -> tuple[dict, str]:
    tm = o["tensors"]["tensors"]
    name = rng.choice(sorted(k for k in tm if k != "extra.weight"))  # never undo _extra_tensor
    return tm[name], name


def _nan_in_data(o, rng):
    t, _ = _tensor(o, rng)
    if t["values"] != "float32" or len(t["data"]) < 4:
        t["data"] = b"\x00" * (len(t["data"]) + 1)
        return
    b = bytearray(t["data"])
    i = rng.randrange(len(b) // 4) * 4
    b[i:i + 4] = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf]))
    t["data"] = bytes(b)


def _shape(o, rng):
    t, _ = _tensor(o, rng)
    s = list(t["shape"])
    s[rng.randrange(len(s))] += rng.choice([1, -1])
    t["shape"] = s


def _drop_tensor(o, rng):
    _, name = _tensor(o, rng)
    del o["tensors"]["tensors"][name]


def _extra_tensor(o, rng):
    o["tensors"]["tensors"]["extra.weight"] = {"shape": [2], "values": "float32", "data": b"\x00" * 8}


def _rename_tensor(o, rng):
    _, name = _tensor(o, rng)
    o["tensors"]["tensors"][name + "x"] = o["tensors"]["tensors"].pop(name)


def _sparse_lie(o, rng):
    t, _ = _tensor(o, rng)
    numel = math.prod(t["shape"])
    k = rng.randrange(4)
    if k == 0:
        t.update(nnz=numel + 1, index="varint", indices=b"\x00" * (numel + 1))
    elif k == 1:  # an index past the end
        t.update(nnz=1, index="varint", indices=varint_encode(np.array([numel])), data=b"\x00" * 4, values="float32")
    elif k == 2:  # a bitmap too short
        t.update(nnz=1, index="bitmap", indices=b"\x01" * ((numel + 7) // 8 - 1), data=b"\x00" * 4, values="float32")
    else:  # a truncated varint
        t.update(nnz=2, index="varint", indices=b"\x80", data=b"\x00" * 8, values="float32")


def _int8_lie(o, rng):
    t, _ = _tensor(o, rng)
    numel = math.prod(t["shape"])
    t.pop("nnz", None), t.pop("index", None), t.pop("indices", None)
    t.update(values="int8", data=b"\x01" * numel, block=rng.choice([0, -1, 2**21, 64]),
             scales=rng.choice([b"", struct.pack("<f", math.nan) * numel, struct.pack("<f", -1.0) * numel]))
    if t["block"] == 64 and len(t["scales"]) == 0:
        t["scales"] = b"\x00"  # wrong scale count


def _values_len(o, rng):
    t, _ = _tensor(o, rng)
    t["data"] = t["data"][:-1] if t["data"] else b"\x00"


def _zstd_lie(o, rng):
    import zstandard

    raw = pack(o["tensors"]["tensors"])
    comp = zstandard.ZstdCompressor().compress(raw)
    size = rng.choice([len(raw) - 1, len(raw) + 1, 0, 2**40])
    if rng.random() < 0.3:
        comp = comp[: len(comp) // 2]
        size = len(raw)
    o["tensors"] = {"codec": 1, "zstd": comp, "size": size}


def _zstd_bomb(o, rng):
    import zstandard

    raw = b"\x00" * (1 << 22)  # 4 MiB of zeros compress to a few hundred bytes
    o["tensors"] = {"codec": 1, "zstd": zstandard.ZstdCompressor().compress(raw), "size": len(raw)}


def _bad_nonce(o, rng):
    o["nonce"] = rng.choice([b"\x00" * 16, b"", None, b"x" * 65])


def _bad_signature(o, rng):
    o["signature"] = rng.choice([b"\x00" * 64, b"", b"x" * 63, "sig", None])


INVALIDATORS: list[Callable[[dict, random.Random], None]] = [
    lambda o, r: o.update(round=o["round"] + r.choice([1, 7, 1000])),
    lambda o, r: o.update(round=-1),
    lambda o, r: o.update(base_version=o["base_version"] + r.choice([1, -1, 5])),
    lambda o, r: o.update(task_id=r.choice(["r0-init-v-1-a0", o["task_id"] + "x", "", "r1-fit-v0-a1"])),
    lambda o, r: o.update(kind=r.choice(["evaluate", "init", "train"])),
    lambda o, r: o.update(device_id=r.choice(["dev-1", "", "dev-0/x", "DEV-0"])),
    lambda o, r: o.update(num_samples=r.choice([0, -1, 2**41, 2**64 - 1, 1.5, "10", None])),
    lambda o, r: o["metrics"].update({r.choice(["train_loss", "x"]): r.choice([math.nan, math.inf, -math.inf])}),
    lambda o, r: o.update(metrics={f"m{i}": 0.0 for i in range(300)}),
    lambda o, r: o.update(metrics={"x" * 100: 1.0}),
    lambda o, r: o.update(metrics={"a": "b"}),
    lambda o, r: o.update(schema=r.choice([0, 2, "1", None])),
    lambda o, r: o.update({r.choice(["extra", "weights", "sig"]): 1}),
    _bad_nonce,
    lambda o, r: o.update(zo={"base_fingerprint": "f", "indices": b"\x01\x00", "g": b"\x00\x00\xc0\x7f"}),
    lambda o, r: o.update(tensors={"codec": r.choice([0, 2, None]), "tensors": o["tensors"]["tensors"]}),
    lambda o, r: o.update(tensors={"codec": 1}),
    lambda o, r: o.update(tensors={"codec": 1, "tensors": {}}),
    _nan_in_data, _shape, _drop_tensor, _extra_tensor, _rename_tensor, _sparse_lie, _int8_lie, _values_len,
    _zstd_lie, _zstd_bomb,
    _bad_signature,
]


LAST_APPLIED: list[str] = []  # names of the edits of the last invalid_update (diagnostics)


def invalid_update(rng: random.Random, valid_obj: dict) -> tuple[dict, bool, bool]:
    """A copy of ``valid_obj`` (a plain, dense fp32 Update map) with one or two invalidating edits
    (each alone makes the update invalid; none undoes another). Also: whether it may be re-signed
    (not when the edit was to the signature itself), and whether only its identity (signature,
    nonce) is wrong, so that it is invalid only where signatures are checked."""
    o = copy.deepcopy(valid_obj)
    applied = []
    for f in rng.sample(INVALIDATORS, rng.choice([1, 1, 2])):
        try:
            f(o, rng)
            applied.append(f)
        except (KeyError, TypeError, AttributeError, IndexError):  # an earlier edit removed what this one edits
            pass
    if not applied:
        o["round"] += 1
        applied.append(None)
    LAST_APPLIED[:] = [getattr(f, "__name__", "round+1") + (f"@{f.__code__.co_firstlineno}" if f else "")
                       for f in applied]
    return o, _bad_signature not in applied, all(f in (_bad_signature, _bad_nonce) for f in applied)


def resign(signer, federation: str, obj: dict) -> dict:
    """``obj`` signed by ``signer`` when its identity fields allow computing the signed bytes."""
    try:
        return dict(obj, signature=signer.sign(federation, obj))
    except (KeyError, TypeError, ValueError, OverflowError):
        return obj


def kd_seeds() -> dict[str, bytes]:
    """Valid kd payloads (the golden ones, tests/kd_helpers.py): a fit update with top-k log-probs,
    its task, the probe set and a consensus; their probe set is ``kd_probe_lines()``."""
    from tests.kd_helpers import build_golden

    return build_golden()


def kd_probe_lines() -> str:
    """The JSONL probe file whose hash the golden kd payloads name."""
    import json

    return "".join(json.dumps(p) + "\n" for p in ({"prompt": "Add 2 and 3.", "response": "5"},
                                                   {"prompt": "Reverse: abc", "response": "cba"}))
