"""Zeroth-order directions z: counter-based, so any element can be drawn without drawing the others.

Why not ``torch.Generator.normal_``: its Mersenne Twister is sequential (one core per parameter) and
costs ~4 ns per value here; a FedKSeed step draws every parameter three times, so on a 135M-param
model drawing z took longer than the two forward passes. Here element ``e`` of parameter ``i``
under seed ``s`` depends only on ``(key, e)`` with ``key = fedmq_protocol.modes.zo.param_seed(s, i)``:
work splits across threads at any element, results never depend on the split, and drawing and
adding fuse into one pass over the weights (~2 ns per value and term on one core here).

Definition (what every device computes, bit for bit):

- ``word(key, n) = mix64(key + (n + 1) * 0x9E3779B97F4A7C15)``: SplitMix64's output n for state
  ``key``; ``mix64`` is SplitMix64's finaliser. All arithmetic modulo 2**64.
- **gaussian** (the paper's N(0, 1)): element ``e`` takes the low (even e) or high (odd e) 32 bits
  ``b`` of ``word(key, e >> 1)``; a 1024-layer ziggurat (Marsaglia & Tsang's construction, R and V
  below) reads layer j and sign from ``b & 2047`` and a 21-bit uniform ``u = b >> 11``.
  If ``u < KI[j]`` (99.6% of values) ``z = float32(u) * W[j]`` in float32; otherwise the element
  draws from its own private stream ``word(word(key ^ SALT, e), m)``, m = 1, 2, ...: the tail
  (j = 0) by Marsaglia's exponential method, wedges by rejection. The tables are computed once with
  50-digit decimal arithmetic and the rare path uses only +, -, *, / (its exp and log are written
  out here), so z is the same on every platform, with or without SIMD libm.
- **rademacher** (SPSA): element ``e`` is -1 if bit ``e & 63`` of ``word(key, e >> 6)`` is set,
  else +1.

``theta += c * z`` is two exactly rounded float32 operations, ``theta + float32(float32(c) * z)``,
never a fused multiply-add, so replaying a ledger gives the same bits everywhere.
"""

from __future__ import annotations

import math
import threading
from decimal import Decimal, localcontext

import numpy as np

from fedmq_protocol.modes.zo import splitmix64

__all__ = [
    "BACKENDS", "DIRECTION_KINDS", "add_terms", "backend_for", "draw", "draw_numpy", "fill_scaled", "kernels_ready",
]

DIRECTION_KINDS = {"gaussian": 0, "rademacher": 1}

GOLDEN = 0x9E3779B97F4A7C15
SALT = 0xD1B54A32D192ED03  # separates an element's private stream from the shared words
# 1024 layers: 99.6% of values take the fast path (256 layers: 98.5%; the rare path costs ~80 cycles)
LAYERS = 1024
ZIG_R = "4.0388498461095045"  # solved so that the top layer's area equals V (50-digit decimal bisection)
ZIG_V = "0.0012263246463530882"  # R f(R) + the tail's area beyond R
IDX_MASK = 2 * LAYERS - 1  # the low bits of a 32-bit word: layer and sign
U_SHIFT = LAYERS.bit_length()  # the remaining high bits: a uniform integer u of 32 - U_SHIFT bits
BLOCK = 4096  # elements per block: every term of a block runs while the block is in L1
# the rare path's constants, shared by both backends
R_FLOAT = float(Decimal(ZIG_R))
LN2 = 6.93147180369123816490e-01 + 1.90821492927058770002e-10  # fdlibm's two-part ln 2, summed
TWO_M53 = 1.0 / 9007199254740992.0


def _ziggurat_tables() -> tuple[np.ndarray, ...]:
    """Layer j spans [0, x_j); x_1 = R, x_0 = V / f(R) (the base strip with the tail folded in).

    Returns W32 (signed widths / 2**u_bits, by ``b & IDX_MASK``), KI2 (fast-path thresholds, by
    ``b & IDX_MASK``), W64 (widths / 2**u_bits), FX (f(x_j), FX[LAYERS] = 1), XJ (x_j),
    XD (1 / (x_j - x_j+1)) and SQUEEZE (+1 where f is concave over the wedge, -1 where convex).
    Decimal arithmetic: the same bits on any platform."""
    with localcontext() as ctx:
        ctx.prec = 50
        r, v = Decimal(ZIG_R), Decimal(ZIG_V)

        def f(x: Decimal) -> Decimal:
            return (-(x * x) / 2).exp()

        x = [Decimal(0)] * (LAYERS + 1)
        x[0], x[1] = v / f(r), r
        for j in range(1, LAYERS - 1):
            x[j + 1] = (-2 * (f(x[j]) + v / x[j]).ln()).sqrt()
        scale = Decimal(2) ** (32 - U_SHIFT)
        ki = np.array([int(x[j + 1] / x[j] * scale) for j in range(LAYERS)], dtype=np.uint32)
        w64 = np.array([float(x[j] / scale) for j in range(LAYERS)], dtype=np.float64)
        fx = np.array([float(f(x[j])) for j in range(LAYERS)] + [1.0], dtype=np.float64)
        xj = np.array([float(v) for v in x[:LAYERS]], dtype=np.float64)
        xd = np.array([0.0] + [float(1 / (x[j] - x[j + 1])) for j in range(1, LAYERS)], dtype=np.float64)
        squeeze = np.array([0] + [1 if x[j] <= 1 else -1 if x[j + 1] >= 1 else 0 for j in range(1, LAYERS)],
                           dtype=np.int64)
    w32 = np.empty(2 * LAYERS, dtype=np.float32)
    w32[0::2], w32[1::2] = w64.astype(np.float32), -w64.astype(np.float32)
    return w32, np.repeat(ki, 2), w64, fx, xj, xd, squeeze


W32, KI2, W64, FX, XJ, XD, SQUEEZE = _ziggurat_tables()


def _series_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp(-k/16) for k < 160, (-1)**n / n! for n <= 7, 1/(2n+1) for n <= 11: correctly rounded
    float64 from decimal arithmetic, identical everywhere."""
    with localcontext() as ctx:
        ctx.prec = 50
        steps = np.array([float((-Decimal(k) / 16).exp()) for k in range(160)], dtype=np.float64)
        taylor = np.array([float(Decimal((-1) ** n) / math.factorial(n)) for n in range(8)], dtype=np.float64)
        odd = np.array([float(Decimal(1) / (2 * n + 1)) for n in range(12)], dtype=np.float64)
    return steps, taylor, odd


EXP_STEPS, EXP_TAYLOR, ODD_RECIP = _series_tables()

_kernels = None
_kernels_lock = threading.Lock()


def _compile():
    """Build the numba kernels (once per process, ~2 s); numba is imported only here."""
    from numba import njit

    u64 = np.uint64
    G, C1, C2 = u64(GOLDEN), u64(0xBF58476D1CE4E5B9), u64(0x94D049BB133111EB)
    S30, S27, S31, S32, SU, S11 = u64(30), u64(27), u64(31), u64(32), u64(U_SHIFT), u64(11)
    M32, SALT64, ONE = u64(0xFFFFFFFF), u64(SALT), u64(1)
    w32, ki2, w64, fx, xj, xd, squeeze = W32, KI2, W64, FX, XJ, XD, SQUEEZE
    r_zig, ln2, two_m53 = R_FLOAT, LN2, TWO_M53

    @njit(inline="always")
    def mix64(z):
        z = (z ^ (z >> S30)) * C1
        z = (z ^ (z >> S27)) * C2
        return z ^ (z >> S31)

    @njit(inline="always")
    def word(key, n):
        return mix64(key + (u64(n) + ONE) * G)

    exp_steps, exp_taylor, odd_recip = EXP_STEPS, EXP_TAYLOR, ODD_RECIP

    @njit
    def exp_neg(a):
        """exp(-a) for 0 <= a < 10 (wedges end at R**2 / 2 = 8.2) from +, -, * only: a = k/16 + r,
        exp(-k/16) from a decimal table, exp(-r) by its Taylor polynomial (|r| < 1/16: relative
        error < 1e-12, ample for a rejection test; what matters is the same bits everywhere)."""
        k = int(a * 16.0)
        r = a - k * 0.0625
        p = exp_taylor[7]
        for n in range(6, -1, -1):
            p = p * r + exp_taylor[n]
        return exp_steps[k] * p

    @njit
    def log_unit(u):
        """log(u) for 0 < u <= 1 from +, -, *, / only: u = m 2**-k, m in [sqrt(1/2), sqrt(2))."""
        k = 0
        while u < 0.7071067811865476:
            u = u * 2.0
            k += 1
        s = (u - 1.0) / (u + 1.0)
        s2 = s * s
        # log(u) = 2 atanh(s) = 2 (s + s^3/3 + ...), |s| <= 0.172: 12 terms reach 1e-19
        p = 0.0
        for n in range(11, -1, -1):
            p = p * s2 + odd_recip[n]
        return 2.0 * s * p - k * ln2

    @njit
    def unit53(w):
        return float((w >> S11) + ONE) * two_m53  # (0, 1]

    @njit
    def gaussian_slow(key, e, b):
        """z of an element the fast ziggurat test rejected (float64; caller rounds to float32)."""
        base = word(key ^ SALT64, e)  # hashed: neighbours' private streams do not overlap
        m = 0
        while True:
            idx = b & u64(IDX_MASK)
            j = int(idx >> ONE)
            sign = -1.0 if idx & ONE else 1.0
            u = b >> SU
            x = float(u) * w64[j]
            if u < ki2[idx]:
                return sign * x
            if j == 0:  # beyond R: Marsaglia's tail method
                while True:
                    m += 1
                    a = -log_unit(unit53(word(base, m))) / r_zig
                    m += 1
                    c = -log_unit(unit53(word(base, m)))
                    if c + c > a * a:
                        return sign * (r_zig + a)
            m += 1
            v = unit53(word(base, m))
            # the chord between the wedge's corners bounds the density from below where it is
            # concave, from above where convex: most wedge tests need no exp
            below_chord = v <= (xj[j] - x) * xd[j]
            if squeeze[j] == 1 and below_chord:
                return sign * x
            if (not (squeeze[j] == -1 and not below_chord)
                    and fx[j] + v * (fx[j + 1] - fx[j]) < exp_neg(0.5 * x * x)):
                return sign * x
            m += 1
            b = word(base, m) & M32

    @njit(inline="always")
    def gaussian_fast(out, i, b, coef, accumulate, rej_i, rej_b, nrej):
        """The ziggurat's fast path for element i from its 32-bit word b; a rejected element is
        queued (its value is computed out of the hot loop, which keeps the loop small)."""
        idx = b & u64(IDX_MASK)
        u = b >> SU
        if u < ki2[idx]:
            zc = coef * (np.float32(np.int32(u)) * w32[idx])
            out[i] = out[i] + zc if accumulate else zc
            return nrej
        rej_i[nrej] = i
        rej_b[nrej] = b
        return nrej + 1

    @njit(inline="always")
    def gaussian_block(out, lo, hi, e0, key, coef, accumulate, rej_i, rej_b):
        nrej = 0
        i = lo
        if (e0 + i) & 1 and i < hi:  # odd first element: the high half of its word
            nrej = gaussian_fast(out, i, word(key, (e0 + i) >> 1) >> S32, coef, accumulate, rej_i, rej_b, nrej)
            i += 1
        state = key + (u64((e0 + i) >> 1) + ONE) * G  # word(key, n) = mix64(state), state += G per word
        while i + 1 < hi:  # whole words: two elements each
            r = mix64(state)
            state += G
            nrej = gaussian_fast(out, i, r & M32, coef, accumulate, rej_i, rej_b, nrej)
            nrej = gaussian_fast(out, i + 1, r >> S32, coef, accumulate, rej_i, rej_b, nrej)
            i += 2
        if i < hi:  # even last element: the low half
            nrej = gaussian_fast(out, i, word(key, (e0 + i) >> 1) & M32, coef, accumulate, rej_i, rej_b, nrej)
        for q in range(nrej):
            i = rej_i[q]
            zc = coef * np.float32(gaussian_slow(key, e0 + i, rej_b[q]))
            out[i] = out[i] + zc if accumulate else zc

    @njit(inline="always")
    def rademacher_put(out, i, r, bit, coef, accumulate):
        # branch-free sign: a data-dependent branch would mispredict every other element
        zc = coef * (np.float32(1.0) - np.float32(2.0) * np.float32((r >> u64(bit)) & ONE))
        out[i] = out[i] + zc if accumulate else zc

    @njit(inline="always")
    def rademacher_block(out, lo, hi, e0, key, coef, accumulate):
        i = lo
        while i < hi and (e0 + i) & 63:  # the rest of a word begun before this block
            rademacher_put(out, i, word(key, (e0 + i) >> 6), (e0 + i) & 63, coef, accumulate)
            i += 1
        state = key + (u64((e0 + i) >> 6) + ONE) * G
        while i + 64 <= hi:  # whole words: 64 elements each, a loop the compiler vectorises
            r = mix64(state)
            state += G
            for bit in range(64):
                rademacher_put(out, i + bit, r, bit, coef, accumulate)
            i += 64
        if i < hi:
            r = mix64(state)
            for bit in range(hi - i):
                rademacher_put(out, i + bit, r, bit, coef, accumulate)

    @njit(nogil=True)
    def add_terms_kernel(theta, e0, keys, coefs, kind):
        n = theta.shape[0]
        rej_i = np.empty(BLOCK, dtype=np.int64)
        rej_b = np.empty(BLOCK, dtype=np.uint64)
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            for t in range(keys.shape[0]):
                if kind == 0:
                    gaussian_block(theta, lo, hi, e0, keys[t], coefs[t], True, rej_i, rej_b)
                else:
                    rademacher_block(theta, lo, hi, e0, keys[t], coefs[t], True)

    @njit(nogil=True)
    def fill_kernel(out, e0, key, coef, kind):
        n = out.shape[0]
        rej_i = np.empty(min(n, BLOCK), dtype=np.int64)
        rej_b = np.empty(min(n, BLOCK), dtype=np.uint64)
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            if kind == 0:
                gaussian_block(out, lo, hi, e0, key, coef, False, rej_i, rej_b)
            else:
                rademacher_block(out, lo, hi, e0, key, coef, False)

    # compile now (one signature each), so the first training step is not the one that pays
    f32 = np.zeros(8, dtype=np.float32)
    add_terms_kernel(f32, 1, np.array([1], dtype=np.uint64), np.array([1.0], dtype=np.float32), 0)
    fill_kernel(f32, 1, u64(1), np.float32(1.0), 1)
    return add_terms_kernel, fill_kernel


def _get():
    global _kernels
    with _kernels_lock:
        if _kernels is None:
            try:
                _kernels = _compile()
            except ImportError as exc:  # pragma: no cover - numba is part of the agent extra
                raise ImportError("zo directions need numba: pip install 'fedmq[agent]'") from exc
        return _kernels


def kernels_ready() -> None:
    """Compile the kernels now (the agent calls this before its first round)."""
    _get()


def _kind(direction: str) -> int:
    try:
        return DIRECTION_KINDS[direction]
    except KeyError:
        raise ValueError(f"unknown direction {direction!r}; expected one of {sorted(DIRECTION_KINDS)}") from None


# -- the numpy backend: the same definition, vectorised with numpy, rare path in plain Python ------
# No numba/LLVM in the process (~141 MB of RSS saved): what a small trainable set (LoRA) uses.
# Slower per element (~90 ns here, ~45x the kernels), which only matters for large sets.
_M64 = (1 << 64) - 1
_NP_CHUNK = 1 << 18  # elements drawn at once: bounds the temporaries (~16 MB)


def _word(key: int, n: int) -> int:
    return splitmix64((key + n * GOLDEN) & _M64)  # = mix64(key + (n + 1) * GOLDEN)


def words(key: int, first: int, count: int) -> np.ndarray:
    """``word(key, n)`` for n in first .. first + count - 1 (numpy uint64 arithmetic wraps)."""
    n = np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)
    z = np.uint64(key) + n * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _exp_neg(a: float) -> float:
    k = int(a * 16.0)
    r = a - k * 0.0625
    p = float(EXP_TAYLOR[7])
    for n in range(6, -1, -1):
        p = p * r + float(EXP_TAYLOR[n])
    return float(EXP_STEPS[k]) * p


def _log_unit(u: float) -> float:
    k = 0
    while u < 0.7071067811865476:
        u, k = u * 2.0, k + 1
    s = (u - 1.0) / (u + 1.0)
    s2 = s * s
    p = 0.0
    for n in range(11, -1, -1):
        p = p * s2 + float(ODD_RECIP[n])
    return 2.0 * s * p - k * LN2


def _unit53(w: int) -> float:
    return float((w >> 11) + 1) * TWO_M53


def gaussian_slow(key: int, e: int, b: int) -> float:
    """The ziggurat's rare path for element e whose 32-bit word b failed the fast test."""
    base = _word(key ^ SALT, e)
    m = 0
    while True:
        idx, u = b & IDX_MASK, b >> U_SHIFT
        j, sign = idx >> 1, (-1.0 if idx & 1 else 1.0)
        x = float(u) * float(W64[j])
        if u < int(KI2[idx]):
            return sign * x
        if j == 0:
            while True:
                a = -_log_unit(_unit53(_word(base, m + 1))) / R_FLOAT
                c = -_log_unit(_unit53(_word(base, m + 2)))
                m += 2
                if c + c > a * a:
                    return sign * (R_FLOAT + a)
        m += 1
        v = _unit53(_word(base, m))
        below = v <= (float(XJ[j]) - x) * float(XD[j])
        if SQUEEZE[j] == 1 and below:
            return sign * x
        if (not (SQUEEZE[j] == -1 and not below)
                and float(FX[j]) + v * (float(FX[j + 1]) - float(FX[j])) < _exp_neg(0.5 * x * x)):
            return sign * x
        m += 1
        b = _word(base, m) & 0xFFFFFFFF


def draw_numpy(key: int, numel: int, direction: str, e0: int = 0) -> np.ndarray:
    """z_key(e0 .. e0 + numel - 1) by the numpy backend (the same bits as the kernels)."""
    _kind(direction)
    out = np.empty(numel, dtype=np.float32)
    for lo in range(0, numel, _NP_CHUNK):
        first, count = e0 + lo, min(_NP_CHUNK, numel - lo)
        e = np.arange(first, first + count, dtype=np.int64)
        if direction == "rademacher":
            w = words(key, first >> 6, ((first + count - 1) >> 6) - (first >> 6) + 1)[(e >> 6) - (first >> 6)]
            bits = (w >> (e & 63).astype(np.uint64)) & np.uint64(1)
            out[lo:lo + count] = np.float32(1.0) - np.float32(2.0) * bits.astype(np.float32)
            continue
        w = words(key, first >> 1, ((first + count - 1) >> 1) - (first >> 1) + 1)[(e >> 1) - (first >> 1)]
        b = np.where(e & 1, w >> np.uint64(32), w & np.uint64(0xFFFFFFFF))
        idx, u = (b & np.uint64(IDX_MASK)).astype(np.int64), b >> np.uint64(U_SHIFT)
        z = u.astype(np.float32) * W32[idx]
        for i in np.flatnonzero(u >= KI2[idx]):
            z[i] = np.float32(gaussian_slow(key, int(e[i]), int(b[i])))
        out[lo:lo + count] = z
    return out


# -- the interface: backend "numba" (the kernels) or "numpy" -----------------------------------
BACKENDS = ("numba", "numpy")
# Up to this many trainable elements the numpy backend is used: 3 draws per step cost < 0.1 s at
# LoRA sizes, less than the kernels' runtime would cost in memory (edge_agent.memory.estimator).
NUMPY_MAX_ELEMENTS = 1 << 21


def backend_for(num_elements: int) -> str:
    """The backend an agent uses for ``num_elements`` trainable elements."""
    return "numpy" if num_elements <= NUMPY_MAX_ELEMENTS else "numba"


def add_terms(theta: np.ndarray, e0: int, terms: list[tuple[int, float]], direction: str,
              backend: str = "numba") -> None:
    """theta[i] += c * z_key(e0 + i) for each (key, c) of ``terms``, in order, in place.

    ``theta`` is a contiguous float32 view of elements ``e0 ..`` of one parameter; the kernels
    release the GIL."""
    if not terms:
        return
    if backend == "numpy":
        for lo in range(0, theta.shape[0], _NP_CHUNK):
            part = theta[lo:lo + _NP_CHUNK]
            for key, c in terms:
                part[:] = part + np.float32(c) * draw_numpy(key, part.shape[0], direction, e0 + lo)
        return
    keys = np.array([k for k, _ in terms], dtype=np.uint64)
    coefs = np.array([c for _, c in terms], dtype=np.float32)
    _get()[0](theta, e0, keys, coefs, _kind(direction))


def fill_scaled(out: np.ndarray, e0: int, key: int, coef: float, direction: str, backend: str = "numba") -> None:
    """out[i] = float32(c) * z_key(e0 + i) (contiguous float32 ``out``)."""
    if backend == "numpy":
        out[:] = np.float32(coef) * draw_numpy(key, out.shape[0], direction, e0)
        return
    _get()[1](out, e0, np.uint64(key), np.float32(coef), _kind(direction))


def draw(key: int, numel: int, direction: str, e0: int = 0, backend: str = "numba") -> np.ndarray:
    """z_key(e0 .. e0 + numel - 1) as a new float32 array."""
    out = np.empty(numel, dtype=np.float32)
    fill_scaled(out, e0, key, 1.0, direction, backend)
    return out
