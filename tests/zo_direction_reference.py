"""The ZO direction definition of ``edge_agent.methods.zo_directions`` written plainly: Python
integers for the counter hash, numpy for the ziggurat's fast path, one element at a time for the
rest. Slow; used to check the compiled kernels bit for bit."""

from __future__ import annotations

import numpy as np

from edge_agent.methods.zo_directions import (
    EXP_STEPS, EXP_TAYLOR, FX, IDX_MASK, KI2, ODD_RECIP, SALT, SQUEEZE, U_SHIFT, W32, W64, XD, XJ, ZIG_R,
)

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
R = float(ZIG_R)
LN2 = 6.93147180369123816490e-01 + 1.90821492927058770002e-10


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def word(key: int, n: int) -> int:
    return mix64((key + (n + 1) * GOLDEN) & M64)


def words(key: int, first: int, count: int) -> np.ndarray:
    n = np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)
    z = np.uint64(key) + n * np.uint64(GOLDEN)  # numpy uint64 arithmetic wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def exp_neg(a: float) -> float:
    k = int(a * 16.0)
    r = a - k * 0.0625
    p = float(EXP_TAYLOR[7])
    for n in range(6, -1, -1):
        p = p * r + float(EXP_TAYLOR[n])
    return float(EXP_STEPS[k]) * p


def log_unit(u: float) -> float:
    k = 0
    while u < 0.7071067811865476:
        u, k = u * 2.0, k + 1
    s = (u - 1.0) / (u + 1.0)
    p = 0.0
    for n in range(11, -1, -1):
        p = p * (s * s) + float(ODD_RECIP[n])
    return 2.0 * s * p - k * LN2


def unit53(w: int) -> float:
    return float((w >> 11) + 1) * (1.0 / 9007199254740992.0)


def slow_gaussian(key: int, e: int, b: int) -> float:
    base = word(key ^ SALT, e)
    m = 0
    while True:
        idx, u = b & IDX_MASK, b >> U_SHIFT
        j, sign = idx >> 1, (-1.0 if idx & 1 else 1.0)
        x = float(u) * float(W64[j])
        if u < int(KI2[idx]):
            return sign * x
        if j == 0:
            while True:
                a = -log_unit(unit53(word(base, m + 1))) / R
                c = -log_unit(unit53(word(base, m + 2)))
                m += 2
                if c + c > a * a:
                    return sign * (R + a)
        m += 1
        v = unit53(word(base, m))
        below = v <= (float(XJ[j]) - x) * float(XD[j])
        if SQUEEZE[j] == 1 and below:
            return sign * x
        if not (SQUEEZE[j] == -1 and not below) and FX[j] + v * (FX[j + 1] - FX[j]) < exp_neg(0.5 * x * x):
            return sign * x
        m += 1
        b = word(base, m) & 0xFFFFFFFF


def draw(key: int, e0: int, count: int, direction: str) -> tuple[np.ndarray, int]:
    """(z of elements e0 .. e0 + count - 1, how many took the slow path)."""
    e = np.arange(e0, e0 + count, dtype=np.int64)
    if direction == "rademacher":
        w = words(key, e0 >> 6, ((e0 + count - 1) >> 6) - (e0 >> 6) + 1)[(e >> 6) - (e0 >> 6)]
        bits = (w >> (e & 63).astype(np.uint64)) & np.uint64(1)
        return (1.0 - 2.0 * bits.astype(np.float32)).astype(np.float32), 0
    w = words(key, e0 >> 1, ((e0 + count - 1) >> 1) - (e0 >> 1) + 1)[(e >> 1) - (e0 >> 1)]
    b = np.where(e & 1, w >> np.uint64(32), w & np.uint64(0xFFFFFFFF))
    idx, u = (b & np.uint64(IDX_MASK)).astype(np.int64), b >> np.uint64(U_SHIFT)
    z = u.astype(np.float32) * W32[idx]
    slow = np.flatnonzero(u >= KI2[idx])
    for i in slow:
        z[i] = np.float32(slow_gaussian(key, int(e[i]), int(b[i])))
    return z, len(slow)
