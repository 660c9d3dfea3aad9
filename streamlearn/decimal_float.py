"""Correctly rounded decimal -> float64 conversion for a compiled JSON scanner.

A compiled JSON scanner splits a number token such as ``-1.2345e-7`` into its significant
decimal digits ``man`` (an unsigned integer of at most 19 digits), a decimal exponent
``exp10`` (the value is ``man * 10**exp10``) and a sign ``neg``. Turning that triple into
the nearest float64 is the hard part: ``float(man) * 10.0**exp10`` rounds twice and is
often one ulp off, and JSON producers (``repr``, ``orjson``, Go, JavaScript) send the
shortest round-tripping form of a double, which has 16 or 17 significant digits in most
cases.

:func:`decimal_to_double` tries, in order:

1. Clinger's fast path: when ``man <= 2**53`` and ``|exp10| <= 22`` both ``float(man)``
   and ``10.0**|exp10|`` are exact doubles, so one IEEE multiply or divide is correctly
   rounded. It covers short numbers (prices, counts, ``0.1``) but not most 16-17 digit
   ones, whose mantissa exceeds ``2**53``.
2. The Eisel-Lemire algorithm (D. Lemire, "Number Parsing at a Gigabyte per Second",
   Software: Practice and Experience 51(8), 2021), structured as Go's
   ``strconv.eiselLemire64``: multiply the normalised mantissa by a truncated 128-bit
   approximation of ``10**exp10`` and keep the result when the bits that were cut off
   cannot change the rounding. It succeeds for nearly all remaining inputs.
3. An exact second chance when Eisel-Lemire gives up on a negative ``exp10``: values
   that are exactly a double although ``man > 2**53``, such as ``1712345678901234.0``
   (a microsecond timestamp written as a float) or ``379213299136794.25``. Eisel-Lemire
   rejects every one of them, as its truncated ``10**exp10`` puts the product just
   below the exact result; without this step about 0.15% of the ``repr`` of uniformly
   random doubles would need the slow parser.

It returns ``(value, ok)``. ``ok`` is ``False`` whenever the result is not guaranteed to
be the correctly rounded one (exact half-way ambiguity, subnormal results, overflow to
infinity, ``exp10`` outside the table); the caller then parses the token with a slow but
correct parser such as Python's ``float()``. It never returns a wrong value with
``ok=True``.

Numba has no 128-bit integer, so :func:`_mul64` builds the 64x64->128-bit product from
32-bit halves. All integer arithmetic is kept in ``np.uint64`` explicitly: numba's
typing of a ``uint64`` mixed with a signed ``int`` loses bits silently (with numba 0.68 a
comparison goes through float64, so ``np.uint64(2**53 + 1) <= 2**53`` is True in compiled
code; arithmetic and bitwise operators give int64, float64 in older releases).

>>> decimal_to_double(np.uint64(12345678901234567), np.int64(-20), False)
(0.00012345678901234567, True)
>>> decimal_to_double(np.uint64(0), np.int64(0), True)
(-0.0, True)
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["POW10_HI", "POW10_LO", "POW10_MAX_EXP10", "POW10_MIN_EXP10", "decimal_to_double"]

POW10_MIN_EXP10 = -348
POW10_MAX_EXP10 = 347


def _pow10_table(lo_exp: int, hi_exp: int) -> tuple[np.ndarray, np.ndarray]:
    """128-bit mantissas of ``10**e`` for ``e`` in ``[lo_exp, hi_exp]``, normalised so
    bit 127 is set and truncated (rounded down), split into (high, low) 64-bit words.
    Exact Python-integer arithmetic; the binary exponent is implied by ``e``."""
    mask = (1 << 64) - 1
    his, los = [], []
    for e in range(lo_exp, hi_exp + 1):
        if e >= 0:
            v = 10**e
            b = v.bit_length()
            m = v >> (b - 128) if b > 128 else v << (128 - b)
        else:
            d = 10**-e  # 2**(b-1) <= d < 2**b, so 2**127 < 2**(b+127)/d < 2**128
            m = (1 << (d.bit_length() + 127)) // d
        assert m.bit_length() == 128
        his.append(m >> 64)
        los.append(m & mask)
    return np.array(his, dtype=np.uint64), np.array(los, dtype=np.uint64)


POW10_HI, POW10_LO = _pow10_table(POW10_MIN_EXP10, POW10_MAX_EXP10)
# Exact float64 powers of ten for the Clinger fast path (10**22 = 5**22 * 2**22, 5**22 < 2**53).
_EXACT_POW10 = np.array([float(10**i) for i in range(23)], dtype=np.float64)
# man < 2**64 < 5**28: man * 10**-k can be an exact double only for k <= 27.
_MAX_EXACT_NEG_EXP10 = 27
_POW5 = np.array([5**k for k in range(_MAX_EXACT_NEG_EXP10 + 1)], dtype=np.uint64)
_EXACT_POW2_NEG = np.array([0.5**k for k in range(_MAX_EXACT_NEG_EXP10 + 1)], dtype=np.float64)


@njit(inline="always")
def _mul64(a: np.uint64, b: np.uint64) -> tuple[np.uint64, np.uint64]:
    """Full 128-bit product of two uint64 values as (high, low) 64-bit words."""
    m32 = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    a_lo = a & m32
    a_hi = a >> s32
    b_lo = b & m32
    b_hi = b >> s32
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> s32) + (lh & m32) + (hl & m32)  # < 3 * 2**32: no overflow
    lo = (mid << s32) | (ll & m32)
    hi = hh + (lh >> s32) + (hl >> s32) + (mid >> s32)
    return hi, lo


@njit(inline="always")
def _leading_zeros(x: np.uint64) -> np.uint64:
    """Number of leading zero bits of a non-zero uint64 (binary search: 32, 16, ... 1)."""
    n = np.uint64(0)
    step = np.uint64(32)
    while step > np.uint64(0):
        if x >> (np.uint64(64) - step) == np.uint64(0):
            n += step
            x = x << step
        step = step >> np.uint64(1)
    return n


@njit(inline="always")
def _eisel_lemire(m: np.uint64, e: np.int64, neg: bool) -> tuple[float, bool]:
    """Go's ``strconv.eiselLemire64`` for a non-zero ``m``: ``(value, ok)``."""
    if e < POW10_MIN_EXP10 or e > POW10_MAX_EXP10:
        return 0.0, False
    idx = e - POW10_MIN_EXP10
    p_hi = POW10_HI[idx]
    p_lo = POW10_LO[idx]

    # Normalisation (the exponent is kept signed: Go's uint64 wrap-around test at the
    # end becomes an explicit range check).
    clz = _leading_zeros(m)
    m = m << clz
    ret_exp2 = ((217706 * e) >> 16) + 64 + 1023 - np.int64(clz)

    # Multiplication by the high word of the approximation.
    x_hi, x_lo = _mul64(m, p_hi)

    # Wider approximation: the low 9 bits are all ones and the low word could carry.
    if x_hi & np.uint64(0x1FF) == np.uint64(0x1FF) and x_lo + m < m:
        y_hi, y_lo = _mul64(m, p_lo)
        merged_hi = x_hi
        merged_lo = x_lo + y_hi
        if merged_lo < x_lo:
            merged_hi += np.uint64(1)
        if (merged_hi & np.uint64(0x1FF) == np.uint64(0x1FF)
                and merged_lo + np.uint64(1) == np.uint64(0) and y_lo + m < m):
            return 0.0, False
        x_hi = merged_hi
        x_lo = merged_lo

    # Shifting to 54 bits.
    msb = x_hi >> np.uint64(63)
    ret_man = x_hi >> (msb + np.uint64(9))
    ret_exp2 -= np.int64(np.uint64(1) ^ msb)

    # Half-way ambiguity (an exact tie that rounding half up would get wrong).
    if (x_lo == np.uint64(0) and x_hi & np.uint64(0x1FF) == np.uint64(0)
            and ret_man & np.uint64(3) == np.uint64(1)):
        return 0.0, False

    # From 54 to 53 bits.
    ret_man += ret_man & np.uint64(1)
    ret_man = ret_man >> np.uint64(1)
    if ret_man >> np.uint64(53) > np.uint64(0):
        ret_man = ret_man >> np.uint64(1)
        ret_exp2 += 1

    # Subnormal (or zero) results and overflow to infinity are left to the caller.
    if ret_exp2 <= 0 or ret_exp2 >= 0x7FF:
        return 0.0, False
    sign = (np.uint64(1) << np.uint64(63)) if neg else np.uint64(0)
    bits = sign | (np.uint64(ret_exp2) << np.uint64(52)) | (ret_man & np.uint64(0xFFFFFFFFFFFFF))
    # numba accepts a scalar ``.view`` only on the direct result of an ``np.<dtype>()`` call.
    return np.uint64(bits).view(np.float64), True


@njit(cache=True, inline="always")
def decimal_to_double(man: np.uint64, exp10: np.int64, neg: bool) -> tuple[float, bool]:
    """``(±man * 10**exp10, ok)``, correctly rounded to float64 when ``ok`` is True.

    ``man`` holds at most 19 decimal digits (it must fit in a uint64). ``ok`` is False
    when the result could not be guaranteed (the caller falls back to a slow parser);
    the value is then meaningless (0.0).
    """
    m = np.uint64(man)
    e = np.int64(exp10)
    if m == np.uint64(0):
        return (-0.0 if neg else 0.0), True

    # Clinger's fast path: exact operands, one correctly rounded IEEE operation.
    if m <= np.uint64(9007199254740992) and -22 <= e <= 22:
        f = np.float64(m)
        if e >= 0:
            f = f * _EXACT_POW10[e]
        else:
            f = f / _EXACT_POW10[-e]
        return (-f if neg else f), True

    f, ok = _eisel_lemire(m, e, neg)
    if ok or e >= 0 or e < -_MAX_EXACT_NEG_EXP10:
        return f, ok

    # Second chance for a value that is exactly a double although man > 2**53, such as
    # "1712345678901234.0" or "379213299136794.25". Eisel-Lemire rejects those when
    # exp10 < 0: its truncated 10**exp10 puts the product just below an exact result.
    # man * 10**-k is exact iff 5**k divides man and q = man / 5**k fits in 53 bits;
    # then q * 2**-k (k <= 27, so a normal double) is one exact multiplication.
    k = -e
    p5 = _POW5[k]
    if m % p5 == np.uint64(0):
        q = m // p5
        fq = np.float64(q)
        if np.uint64(fq) == q:
            f = fq * _EXACT_POW2_NEG[k]
            return (-f if neg else f), True
    return 0.0, False
