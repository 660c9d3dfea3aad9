"""streamlearn.decimal_float: the compiled decimal -> float64 conversion against Python's
``float()`` (correctly rounded), bit for bit, whenever it reports ``ok``."""

from __future__ import annotations

import decimal
import math
import random

import numpy as np
import pytest
from numba import njit

from streamlearn.decimal_float import (
    POW10_HI,
    POW10_LO,
    POW10_MAX_EXP10,
    POW10_MIN_EXP10,
    decimal_to_double,
)


@njit
def _convert_all(mans, exps, negs):
    n = mans.shape[0]
    out = np.empty(n, dtype=np.float64)
    ok = np.empty(n, dtype=np.bool_)
    for i in range(n):
        out[i], ok[i] = decimal_to_double(mans[i], exps[i], negs[i])
    return out, ok


def _split(s: str) -> tuple[int, int, bool]:
    """Decimal string -> (man, exp10, neg), the way a JSON scanner splits a number."""
    d = decimal.Decimal(s)
    sign, digits, exp = d.as_tuple()
    man = int("".join(map(str, digits)))
    return man, int(exp), bool(sign)


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.uint64))


def _call(man: int, exp10: int, neg: bool) -> tuple[float, bool]:
    return decimal_to_double(np.uint64(man), np.int64(exp10), neg)


def _check(triples: list[tuple[int, int, bool]]) -> np.ndarray:
    """Convert every (man, exp10, neg); assert each ok result equals float() bit for bit;
    return the ok mask."""
    assert all(0 <= m < 2**64 for m, _, _ in triples)
    mans = np.array([t[0] for t in triples], dtype=np.uint64)
    exps = np.array([t[1] for t in triples], dtype=np.int64)
    negs = np.array([t[2] for t in triples], dtype=np.bool_)
    out, ok = _convert_all(mans, exps, negs)
    want = np.array([float(f"{'-' if g else ''}{m}e{e}") for m, e, g in triples],
                    dtype=np.float64)
    bad = np.flatnonzero(ok & (out.view(np.uint64) != want.view(np.uint64)))
    assert bad.size == 0, [(triples[i], out[i], want[i]) for i in bad[:10]]
    return ok


def test_table_matches_go_rows():
    assert POW10_MIN_EXP10 == -348 and POW10_MAX_EXP10 == 347
    assert POW10_HI.dtype == np.uint64 and POW10_HI.shape == (696,) == POW10_LO.shape
    assert int(POW10_HI[0]) == 0xFA8FD5A0081C0288
    assert int(POW10_LO[0]) == 0x1732C869CD60E453
    assert int(POW10_HI[43 - POW10_MIN_EXP10]) == 0xE596B7B0C643C719
    # 10**0 normalised is exactly 2**127: top bit set, every other bit zero.
    assert int(POW10_HI[-POW10_MIN_EXP10]) == 1 << 63 and int(POW10_LO[-POW10_MIN_EXP10]) == 0
    assert np.all(POW10_HI >> np.uint64(63) == np.uint64(1))


HARD = [
    "9007199254740993", "9007199254740992.5", "9007199254740991.5", "9007199254740994.5",
    "9007199254740995", "2.2250738585072014e-308", "2.2250738585072011e-308",
    "2.2250738585072012e-308", "1.7976931348623157e308", "1.7976931348623158e308",
    "1.7976931348623159e308", "5e-324", "4.9406564584124654e-324", "1e23", "1e22", "1e-22",
    "8.98846567431158e307", "0.1", "0.2", "0.3", "18446744073709551615",
    "18446744073709551614", "9999999999999999999", "1000000000000000000", "123456789e10",
    "1.000000000000000111", "1.000000000000000222", "1.0000000000000002",
    "0.1000000000000000055", "3.141592653589793", "2.718281828459045",
    "1e308", "1e-307", "1e-308", "4.4501477170144023e-308", "1.448997445238699",
    "7.3177701707893310e+15", "2.4703282292062327e-324", "1e-400", "1e400", "123400000",
    "1.2340000000000000000e5", "1.0e0", "100e-2", "4503599627370496.5", "4503599627370497.5",
]


def test_hard_cases():
    triples = [_split(s) for s in HARD]
    ok = _check(triples + [(m, e, not g) for m, e, g in triples])
    assert (ok[: len(HARD)] == ok[len(HARD):]).all()  # the sign never matters
    by_str = dict(zip(HARD, ok[: len(HARD)], strict=False))
    for s in ("0.1", "0.3", "1e22", "1.7976931348623157e308", "2.2250738585072014e-308",
              "18446744073709551615", "8.98846567431158e307", "3.141592653589793"):
        assert by_str[s], s
    # Exact half-way, subnormal and overflow cases are left to the slow parser.
    for s in ("9007199254740993", "1e23", "5e-324", "1.7976931348623159e308", "1e400"):
        assert not by_str[s], s
    assert _call(*_split("1.7976931348623157e308")) == (1.7976931348623157e308, True)


def test_zero_and_sign():
    pos, ok = _call(0, 0, False)
    assert ok and _bits(pos) == 0
    neg, ok = _call(0, 5, True)
    assert ok and _bits(neg) == 1 << 63
    assert _call(0, 10_000, False)[1]  # zero with any exponent, even outside the table
    assert _call(15, -1, True) == (-1.5, True)
    v, ok = _call(12345678901234567891, -30, True)
    assert ok and _bits(v) == _bits(-float("12345678901234567891e-30"))
    assert _call(1, 400, False)[1] is False and _call(1, -400, True)[1] is False


def test_fast_path_boundary():
    # 2**53 itself is in the fast path, 2**53 + 1 is not (an int-to-float comparison
    # would wrongly admit it); both must round correctly when ok.
    assert _call(2**53, 0, False) == (float(2**53), True)
    assert _call(2**53, -22, False) == (float(f"{2**53}e-22"), True)
    _check([(2**53 + d, e, False) for d in range(-3, 4) for e in (-23, -22, 0, 22, 23)])


def test_repr_of_random_floats():
    """JSON producers' output: shortest round-trip repr (mostly 16-17 digits) of doubles
    across the whole exponent range, plus the same digits with random exponents."""
    rng = random.Random(1234)
    triples = []
    normal = []
    while len(triples) < 150_000:
        x = np.uint64(rng.getrandbits(64)).view(np.float64)
        if not math.isfinite(x):
            continue
        triples.append(_split(repr(float(x))))
        normal.append(abs(x) >= 2.2250738585072014e-308)
    ok = _check(triples)
    normal = np.array(normal)
    assert ok[normal].mean() > 0.999, ok[normal].mean()
    # Same for values of ordinary magnitude (where most JSON numbers live).
    moderate = []
    for _ in range(50_000):
        x = rng.uniform(-1.0, 1.0) * 10.0 ** rng.randint(-30, 30)
        moderate.append(_split(repr(x)))
    ok = _check(moderate)
    assert ok.mean() > 0.999, ok.mean()
    long_ = [t for t in moderate if len(str(t[0])) >= 16]
    assert len(long_) > 30_000
    assert _check(long_).mean() > 0.999


def test_random_mantissas_and_exponents():
    rng = random.Random(99)
    triples = []
    for _ in range(150_000):
        digits = rng.randint(1, 19)
        man = rng.randint(10 ** (digits - 1), 10**digits - 1)
        if rng.random() < 0.1:
            man *= 10 ** rng.randint(0, 19 - digits)  # trailing zeros
        triples.append((man, rng.randint(-340, 320), rng.random() < 0.5))
    ok = _check(triples)
    # Everything in the normal range that is not an exact half-way case converts.
    in_range = np.array([-307 + 19 <= e <= 308 - 19 for _, e, _ in triples])
    assert ok[in_range].mean() > 0.999
    # Full 19-digit mantissas near 2**64.
    _check([(2**64 - 1 - rng.randrange(10**6), rng.randint(-340, 320), False)
            for _ in range(5_000)])


def _midpoints(rng: random.Random, count: int) -> list[tuple[int, int, bool]]:
    """Decimals just below, at (where it has <= 19 digits) and just above the exact
    midpoint between two adjacent doubles: the inputs where truncation errors matter."""
    ctx = decimal.Context(prec=1200)
    out = []
    while len(out) < count:
        x = float(np.uint64(rng.getrandbits(63)).view(np.float64))
        if not (2.3e-308 < x < 1.7e308):
            continue
        mid = ctx.divide(ctx.add(decimal.Decimal(x),
                                 decimal.Decimal(math.nextafter(x, math.inf))), 2)
        _, digits, exp = mid.normalize(ctx).as_tuple()
        if len(digits) <= 19:
            out.append((int("".join(map(str, digits))), int(exp), False))
        below = decimal.Context(prec=19, rounding=decimal.ROUND_DOWN).plus(mid)
        _, digits, exp = below.as_tuple()
        man = int("".join(map(str, digits)))
        out.append((man, int(exp), False))
        if man + 1 < 10**19:
            out.append((man + 1, int(exp), True))
    return out


def test_near_halfway():
    rng = random.Random(7)
    ok = _check(_midpoints(rng, 20_000))
    assert ok.mean() > 0.99
    # Integers halfway between doubles above 2**53 (exactly representable as 19 digits).
    exact = []
    for _ in range(5_000):
        x = float(rng.randrange(2**53, 10**19)) if rng.random() < 0.5 else float(
            rng.randrange(2**53, 2**60))
        nxt = math.nextafter(x, math.inf)
        mid = (int(x) + int(nxt)) // 2
        if mid < 10**19:
            exact += [(mid, 0, False), (mid - 1, 0, False), (mid + 1, 0, False)]
    ok = _check(exact)
    assert ok[1::3].all() and ok[2::3].all()
    # Exact ties: Go's Eisel-Lemire keeps those where rounding half up is also rounding
    # half to even (checked bit for bit above) and leaves the others to the slow parser.
    ties = ok[0::3]
    assert 0.3 < ties.mean() < 0.7


@pytest.mark.parametrize("s", ["1712345678901234.0", "379213299136794.25", "-4503599627370495.5",
                               "5464310227355511.0", "0.5000000000000000000", "1e-27",
                               "9007199254740993e-27", "7450580596923828125e-27"])
def test_exact_value_with_long_mantissa(s):
    """Exactly representable values whose mantissa exceeds 2**53 with exp10 < 0: Go's
    Eisel-Lemire gives up on them, the exact second chance converts them."""
    man, e, neg = _split(s)
    v, ok = _call(man, e, neg)
    assert ok and _bits(v) == _bits(float(s)), (s, v)


def test_exact_second_chance_rejects_inexact():
    # 5**k divides man but q = man / 5**k needs 54+ bits: not exact, not ok.
    for man, e in ((90071992547409925, -1), (18014398509481985 * 25, -2)):
        v, ok = _call(man, e, False)
        assert not ok or _bits(v) == _bits(float(f"{man}e{e}"))
    assert _call(90071992547409925, -1, False)[1] is False  # a tie, rounding half up fails
    _check([(5**27 * q, -27, False) for q in (1, 2)] + [(5**26 * 2**j, -26, False)
                                                           for j in range(4)])


@pytest.mark.parametrize("s", ["0.1", "-0.0", "123.456e-7", "-9.999999999999999e22"])
def test_split_roundtrip(s):
    man, e, neg = _split(s)
    v, ok = _call(man, e, neg)
    assert ok and _bits(v) == _bits(float(s))
