"""JSON event messages straight into NumPy columns, in one compiled pass.

Why: a JSON library hands back Python objects, one float object per numeric field (74
for a wide event), and those objects cost more than the parse itself: orjson's dicts or
msgspec's typed structs leave the worker slower than a bare ``orjson.loads`` of the same
bytes.  This scanner reads the concatenated messages once, in Numba, and writes what
the model needs: float64 columns, hashed categorical slots (CRC-32 of ``field\\x1fvalue``,
as :func:`streamlearn.features.stable_hash`), labels and ids.

The contract: a row it accepts is one that ``orjson.loads`` plus
:meth:`Vectorizer.row <streamlearn.features.Vectorizer.row>` would accept, with the same
values (tests compare them on random, adversarial and mutated messages).  Whatever it is
not sure of, it leaves to that careful path, which decides and says why: invalid JSON, a
non-object, a value of the wrong type, an escaped key, a repeated key, nesting deeper
than :data:`MAX_DEPTH`, non-ASCII bytes that are not valid UTF-8, a number from 1e308
up anywhere (orjson refuses infinities) or past
:data:`~streamlearn.features.MAX_ABS_VALUE` where it reads, a label that is not 0/1.

Numbers: each token is split into up to 19 significant digits and a decimal exponent
and converted exactly by :func:`streamlearn.decimal_float.decimal_to_double`; the rare
token it cannot convert exactly (more digits, an undecidable half-way case) is parsed by
Python's ``float`` afterwards, so every value equals ``float(token)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numba import njit

from streamlearn.aggregates import AggregateInputs
from streamlearn.decimal_float import decimal_to_double
from streamlearn.features import _MISSING, MAX_ABS_VALUE, FeatureBatch, Vectorizer

MAX_DEPTH = 128
"""Nesting (arrays, objects) the scanner follows inside a field it skips; deeper goes the
careful way (orjson's own limit is 1024)."""

# What a key of the spec holds (slot kinds)
_NUMBER, _CATEGORY, _ID, _LABEL = 0, 1, 2, 3
# What a categorical or id field held (per-row kinds): a string with escapes is _ESC
_NONE, _INT, _STR, _ESC = 0, 1, 2, 3
_OBJ, _ARR = 0, 1  # container kinds on the skip stack
_INT64_END = np.uint64(2**63)  # the magnitude of int64's least value


# The compiled functions below take arrays but never allocate one.  Compiled without the
# Numba runtime (_nrt=False, as Numba's developers do to show its cost) they skip an
# atomic reference count per call and array argument: on the benchmark's wide events the
# syntax check alone went from 8.2 to 2.0 us per event.  The small ones are inlined.


def _crc_table() -> np.ndarray:
    """The byte table of CRC-32 (zlib's polynomial, reflected)."""
    table = np.empty(256, dtype=np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[b] = c
    return table


_CRC = _crc_table()


@njit(_nrt=False, inline="always")
def _crc_more(table, crc, buf, start, end):  # pragma: no cover - compiled
    """``zlib.crc32(buf[start:end], crc)``."""
    c = np.uint32(crc) ^ np.uint32(0xFFFFFFFF)
    for i in range(start, end):
        c = table[(c ^ buf[i]) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
    return c ^ np.uint32(0xFFFFFFFF)


@njit(_nrt=False, inline="always")
def _at(buf, i, end):  # pragma: no cover - compiled
    """The byte at ``i``, or 0 past the message's end (0 is never valid JSON syntax)."""
    return buf[i] if i < end else 0


@njit(_nrt=False, inline="always")
def _ws(buf, i, end):  # pragma: no cover - compiled
    while i < end:
        c = buf[i]
        if c == 32 or c == 10 or c == 13 or c == 9:
            i += 1
        else:
            break
    return i


@njit(_nrt=False, inline="always")
def _hex(c):  # pragma: no cover - compiled
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


@njit(_nrt=False, inline="always")
def _escape_u(buf, i, end):  # pragma: no cover - compiled
    """The code unit of the ``\\uXXXX`` at ``i``, or -1."""
    if i + 6 > end or buf[i] != 92 or buf[i + 1] != 117:
        return -1
    code = 0
    for t in range(i + 2, i + 6):
        h = _hex(buf[t])
        if h < 0:
            return -1
        code = code * 16 + h
    return code


@njit(_nrt=False, inline="always")
def _string(buf, i, end):  # pragma: no cover - compiled
    """Past the string opening at ``i``: ``(index after its closing quote, had an
    escape)``; index -1 when invalid (a control character, a bad escape, a surrogate
    escape that is not half of a pair, which orjson refuses)."""
    i += 1
    escaped = False
    while i < end:
        c = buf[i]
        if c == 34:  # "
            return i + 1, escaped
        if c == 92:  # backslash
            escaped = True
            e = _at(buf, i + 1, end)
            if e == 117:  # \uXXXX
                code = _escape_u(buf, i, end)
                if code < 0 or 0xDC00 <= code <= 0xDFFF:
                    return -1, escaped
                if 0xD800 <= code <= 0xDBFF:  # must be followed by its low half
                    low = _escape_u(buf, i + 6, end)
                    if not 0xDC00 <= low <= 0xDFFF:
                        return -1, escaped
                    i += 6
                i += 6
            elif e == 34 or e == 92 or e == 47 or e == 98 or e == 102 or e == 110 \
                    or e == 114 or e == 116:
                i += 2
            else:
                return -1, escaped
        elif c < 32:
            return -1, escaped
        else:
            i += 1
    return -1, escaped


@njit(_nrt=False, inline="always")
def _is_digit(c):  # pragma: no cover - compiled
    return 48 <= c <= 57


@njit(_nrt=False, inline="always")
def _digit_run(buf, i, end, man, room):  # pragma: no cover - compiled
    """Up to ``room`` digits from ``i`` appended to ``man``: ``(index after them, man)``.
    (Two digits per step measured no faster in bench_vectorize, so one it is.)"""
    stop = min(end, i + room)
    while i < stop and _is_digit(buf[i]):
        man = man * np.uint64(10) + np.uint64(buf[i] - 48)
        i += 1
    return i, man


@njit(_nrt=False, inline="always")
def _number(buf, i, end):  # pragma: no cover - compiled
    """The JSON number at ``i``: ``(index after it, its first 19 significant digits,
    decimal exponent, negative, significant digits seen, is an integer)``; index -1 if
    invalid.  ``man * 10**exp10`` is the number, cut to those 19 digits."""
    neg = False
    if _at(buf, i, end) == 45:  # -
        neg = True
        i += 1
    man = np.uint64(0)
    exp10 = 0
    c = _at(buf, i, end)
    if c == 48:  # a lone 0 (JSON has no leading zeros)
        i += 1
        digits = 0
    elif 49 <= c <= 57:
        first = i
        i, man = _digit_run(buf, i, end, man, 19)
        digits = i - first
        while i < end and _is_digit(buf[i]):  # past 19 digits: only the magnitude counts
            exp10 += 1
            digits += 1
            i += 1
    else:
        return -1, man, exp10, neg, 0, False
    is_int = True
    if _at(buf, i, end) == 46:  # .
        is_int = False
        i += 1
        first = i
        if digits == 0:  # the zeros of 0.000x are not significant
            while i < end and buf[i] == 48:
                i += 1
            exp10 -= i - first
        start = i
        i, man = _digit_run(buf, i, end, man, 19 - digits)
        exp10 -= i - start
        digits += i - start
        while i < end and _is_digit(buf[i]):
            digits += 1
            i += 1
        if i == first:
            return -1, man, exp10, neg, digits, False
    c = _at(buf, i, end)
    if c == 101 or c == 69:  # e E
        is_int = False
        i += 1
        c = _at(buf, i, end)
        exp_neg = c == 45
        if c == 45 or c == 43:
            i += 1
        first = i
        e = 0
        while i < end and _is_digit(buf[i]):
            if e < 100_000:
                e = e * 10 + (buf[i] - 48)
            i += 1
        if i == first:
            return -1, man, exp10, neg, digits, False
        exp10 += -e if exp_neg else e
    return i, man, exp10, neg, digits, is_int


@njit(_nrt=False, inline="always")
def _literal(buf, i, end):  # pragma: no cover - compiled
    """Past ``true``, ``false`` or ``null`` at ``i``; -1 if none is there."""
    c = _at(buf, i, end)
    if c == 116 and i + 4 <= end and buf[i + 1] == 114 and buf[i + 2] == 117 \
            and buf[i + 3] == 101:
        return i + 4
    if c == 110 and i + 4 <= end and buf[i + 1] == 117 and buf[i + 2] == 108 \
            and buf[i + 3] == 108:
        return i + 4
    if c == 102 and i + 5 <= end and buf[i + 1] == 97 and buf[i + 2] == 108 \
            and buf[i + 3] == 115 and buf[i + 4] == 101:
        return i + 5
    return -1


@njit(_nrt=False, inline="always")
def _key(buf, i, end):  # pragma: no cover - compiled
    """A key and its colon at ``i``: index of the value after them, or -1."""
    if _at(buf, i, end) != 34:
        return -1
    i, _ = _string(buf, i, end)
    if i < 0:
        return -1
    i = _ws(buf, i, end)
    if _at(buf, i, end) != 58:  # :
        return -1
    return _ws(buf, i + 1, end)


@njit(_nrt=False)
def _skip(buf, i, end, stack):  # pragma: no cover - compiled
    """Past the JSON value at ``i`` (checked, not read); -1 if invalid or too deep."""
    depth = 0
    while True:
        c = _at(buf, i, end)
        if c == 123 or c == 91:  # { [
            i = _ws(buf, i + 1, end)
            close = 125 if c == 123 else 93
            if _at(buf, i, end) == close:
                i += 1
            else:
                if depth == stack.size:
                    return -1
                stack[depth] = _OBJ if c == 123 else _ARR
                depth += 1
                if c == 123:
                    i = _key(buf, i, end)
                    if i < 0:
                        return -1
                continue  # to the first element
        elif c == 34:
            i, _ = _string(buf, i, end)
        elif c == 45 or 48 <= c <= 57:
            i, _, exp10, _, digits, _ = _number(buf, i, end)
            if digits > 0 and exp10 + min(digits, 19) > 308:  # 1e308 up: orjson refuses
                return -1  # an infinity, and the careful path rules on the rest
        else:
            i = _literal(buf, i, end)
        if i < 0:
            return -1
        # after a value: close what ends here, or go on to the next element
        while depth > 0:
            i = _ws(buf, i, end)
            c = _at(buf, i, end)
            if c == 44:  # ,
                i = _ws(buf, i + 1, end)
                if stack[depth - 1] == _OBJ:
                    i = _key(buf, i, end)
                    if i < 0:
                        return -1
                break
            if c == (125 if stack[depth - 1] == _OBJ else 93):
                depth -= 1
                i += 1
            else:
                return -1
        if depth == 0:
            return i


@njit(_nrt=False, inline="always")
def _lookup(buf, start, end, table, keys, key_off):  # pragma: no cover - compiled
    """Slot of the key ``buf[start:end]`` (FNV-1a into an open-addressed table), or -1."""
    h = np.uint64(2166136261)
    for i in range(start, end):
        h = ((h ^ np.uint64(buf[i])) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
    mask = table.size - 1
    p = np.int64(h & np.uint64(mask))
    while True:
        s = table[p]
        if s < 0:
            return -1
        a, b = key_off[s], key_off[s + 1]
        if b - a == end - start:
            same = True
            for t in range(b - a):
                if keys[a + t] != buf[start + t]:
                    same = False
                    break
            if same:
                return s
        p = (p + 1) & mask


@njit(_nrt=False, inline="always")
def _guess(buf, i, end, s, keys, key_off):  # pragma: no cover - compiled
    """``s`` if its key and closing quote are at ``i``, else -1."""
    if s < 0:
        return -1
    a, b = key_off[s], key_off[s + 1]
    if i + (b - a) >= end or buf[i + (b - a)] != 34:
        return -1
    for t in range(b - a):
        if buf[i + t] != keys[a + t]:
            return -1
    return s


@njit(_nrt=False, inline="always")
def _category(buf, r, m, kept, a, b, t, out):  # pragma: no cover - compiled
    """Row ``r``'s category ``m``: its kind and span, and unless escaped (Python reads
    those) its slot, the CRC-32 of ``field\\x1f`` and the value's bytes ``buf[a:b]``."""
    crc_prefix, crc, first, mask = t[5], t[6], t[7], t[8]
    hashed, cat_kind, cat_span = out[2], out[3], out[4]
    if kept != _ESC:
        hashed[r, m] = first[0] + (_crc_more(crc, crc_prefix[m], buf, a, b) & mask)
    cat_kind[r, m] = kept
    cat_span[r, m, 0], cat_span[r, m, 1] = a, b


@njit(_nrt=False)
def _row(buf, r, i, end, t, out, seen, nxt, stack):  # pragma: no cover - compiled
    """Read message ``r`` (``buf[i:end]``) into the outputs; False when the careful
    path must decide.  ``t``: the spec's tables; ``out``: the output arrays; ``nxt[s]``:
    the slot whose key followed slot ``s``'s last time (producers keep their key order,
    so a key is usually matched by one comparison, without hashing)."""
    table, keys, key_off, kind, col, _, _, first, _, max_abs, binary, _ = t
    num, lab, hashed, cat_kind, _, id_kind, id_val, id_span, hard, n_hard = out
    prev = nxt.size - 1  # the slot before the first key
    i = _ws(buf, i, end)
    if _at(buf, i, end) != 123:
        return False
    i = _ws(buf, i + 1, end)
    if _at(buf, i, end) == 125:
        i += 1
    else:
        while True:
            if _at(buf, i, end) != 34:
                return False
            s = _guess(buf, i + 1, end, nxt[prev], keys, key_off)
            if s >= 0:
                j = i + 2 + key_off[s + 1] - key_off[s]
            else:
                j, escaped = _string(buf, i, end)
                if j < 0 or escaped:  # an escaped key may spell a spec field
                    return False
                s = _lookup(buf, i + 1, j - 1, table, keys, key_off)
                if s >= 0:
                    nxt[prev] = s
            if s >= 0:
                prev = s
            i = _ws(buf, j, end)
            if _at(buf, i, end) != 58:
                return False
            i = _ws(buf, i + 1, end)
            c = _at(buf, i, end)
            if s < 0:
                i = _skip(buf, i, end, stack)
                if i < 0:
                    return False
            else:
                if seen[s] == r:  # a repeated key: orjson keeps the last, the rules judge
                    return False
                seen[s] = r
                k, m = kind[s], col[s]
                if c == 110:  # null: missing
                    if _literal(buf, i, end) != i + 4:
                        return False
                    i += 4
                    if k == _NUMBER:
                        num[r, m] = np.nan
                    elif k == _LABEL:
                        lab[r] = np.nan
                    elif k == _CATEGORY:
                        hashed[r, m] = first[m + 1]
                        cat_kind[r, m] = _NONE
                    else:
                        id_kind[r] = _NONE
                elif k == _NUMBER or k == _LABEL:
                    if not (c == 45 or 48 <= c <= 57):
                        return False
                    j, man, exp10, neg, digits, _ = _number(buf, i, end)
                    if j < 0:
                        return False
                    ok = False
                    if digits <= 19:
                        x, ok = decimal_to_double(man, exp10, neg)
                    if not ok:  # float() reads it afterwards, and the rules are checked then
                        h = n_hard[0]
                        hard[h, 0], hard[h, 1], hard[h, 2], hard[h, 3] = r, m, i, j
                        n_hard[0] = h + 1
                        x = np.nan
                    elif abs(x) > max_abs or (k == _LABEL and binary and x != 0.0 and x != 1.0):
                        return False
                    if k == _NUMBER:
                        num[r, m] = x
                    else:
                        lab[r] = x
                    i = j
                elif c == 34:  # a string category or id
                    j, escaped = _string(buf, i, end)
                    if j < 0:
                        return False
                    # unescaped: the value is the bytes between the quotes; escaped:
                    # the whole token, which Python decodes (and hashes) afterwards
                    kept = _ESC if escaped else _STR
                    a, b = (i, j) if escaped else (i + 1, j - 1)
                    if k == _CATEGORY:
                        _category(buf, r, m, kept, a, b, t, out)
                    else:
                        id_kind[r] = kept
                        id_span[r, 0], id_span[r, 1] = a, b
                    i = j
                elif c == 45 or 48 <= c <= 57:  # an integer category or id
                    j, man, _, neg, digits, is_int = _number(buf, i, end)
                    # an int64 (what the rules take for a category); "-0" is the
                    # integer 0, which hashes as "0": both left to the careful path
                    limit = _INT64_END if neg else _INT64_END - np.uint64(1)
                    if j < 0 or not is_int or digits > 19 or man > limit \
                            or (neg and man == np.uint64(0)):
                        return False
                    if k == _CATEGORY:
                        _category(buf, r, m, _INT, i, j, t, out)
                    else:
                        id_kind[r] = _INT
                        # -2**63 has no positive int64: negate man - 1 (man >= 1 here)
                        id_val[r] = -np.int64(man - np.uint64(1)) - 1 if neg else np.int64(man)
                    i = j
                else:  # a bool, array or object where the rules want something else
                    return False
            i = _ws(buf, i, end)
            c = _at(buf, i, end)
            if c == 44:
                i = _ws(buf, i + 1, end)
            elif c == 125:
                i += 1
                break
            else:
                return False
    return _ws(buf, i, end) == end


@njit(cache=True, _nrt=False)
def _scan(buf, starts, t, out, careful, seen, nxt, stack):  # pragma: no cover - compiled
    num, lab, hashed, cat_kind = out[0], out[1], out[2], out[3]
    id_kind, n_hard = out[5], out[9]
    first, time = t[7], t[11]
    for r in range(starts.size - 1):
        num[r, :] = np.nan
        lab[r] = np.nan
        for m in range(hashed.shape[1]):
            hashed[r, m] = first[m + 1]
            cat_kind[r, m] = _NONE
        id_kind[r] = _NONE
        before = n_hard[0]
        sure = _row(buf, r, starts[r], starts[r + 1], t, out, seen, nxt, stack)
        # the aggregates need the event time (NaN here as well when float() reads it)
        careful[r] = not sure or (time >= 0 and np.isnan(num[r, time]))
        if careful[r]:
            n_hard[0] = before  # the careful path reads its numbers itself


@dataclass(frozen=True, slots=True)
class JsonScan:
    """What :meth:`JsonColumns.read` made of some messages."""

    batch: FeatureBatch  # the rows it is sure of, in message order
    sure: np.ndarray  # their message indices
    careful: np.ndarray  # the other messages' indices, for the careful path


class JsonColumns:
    """A spec's compiled JSON reader (see the module's docstring).

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",), label="y",
    ...                  hash_bits=4)
    >>> vec = Vectorizer(spec)
    >>> scan = JsonColumns(vec).read([b'{"event_id": 1, "x": 2.5, "c": "a", "y": 1}',
    ...                               b'{"x": "two"}', b'{"event_id": "e3", "x": null}'])
    >>> scan.batch.numeric.tolist(), scan.batch.ids, scan.careful.tolist()
    ([[2.5], [nan]], [1, 'e3'], [1])
    >>> int(scan.batch.hashed[0, 0]) == vec.slot("c", "a")
    True
    """

    def __init__(self, vectorizer: Vectorizer) -> None:
        self.vectorizer = vec = vectorizer
        spec, inputs = vec.spec, vec.inputs
        self.spec, self.inputs = spec, inputs
        names = [*inputs.numeric, spec.label, *inputs.categorical, spec.id_field]
        kinds = ([_NUMBER] * len(inputs.numeric) + [_LABEL]
                 + [_CATEGORY] * len(inputs.categorical) + [_ID])
        cols = [*range(len(inputs.numeric)), -1, *range(len(inputs.categorical)), 0]
        # a name read twice (a label that is also a feature...): the careful path only
        self.usable = len(set(names)) == len(names)
        encoded = [name.encode() for name in names]
        size = 16
        while size < 4 * len(names):
            size *= 2
        table = np.full(size, -1, dtype=np.int32)
        for s, key in enumerate(encoded):
            h = 2166136261
            for b in key:
                h = ((h ^ b) * 16777619) & 0xFFFFFFFF
            p = h & (size - 1)
            while table[p] >= 0:
                p = (p + 1) & (size - 1)
            table[p] = s
        key_off = np.zeros(len(encoded) + 1, dtype=np.int64)
        key_off[1:] = np.cumsum([len(k) for k in encoded])
        crc_prefix = np.array([zlib.crc32(f"{name}\x1f".encode()) for name in inputs.categorical],
                              dtype=np.uint32)
        # first[0]: the first hashed slot; first[1 + j]: field j's slot when missing
        first = np.array([spec.first_slot, *(vec.slot(name, _MISSING)
                                             for name in inputs.categorical)], dtype=np.int64)
        self._tables = (table, np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8), key_off,
                        np.array(kinds, dtype=np.int8), np.array(cols, dtype=np.int64),
                        crc_prefix, _CRC, first, np.uint32((1 << spec.hash_bits) - 1),
                        MAX_ABS_VALUE, spec.task != "regression",
                        -1 if inputs.time is None else inputs.time)
        # which key followed which last time: a hint, shared by calls (see _row)
        self._next = np.full(len(names) + 1, -1, dtype=np.int64)

    def read(self, values: Sequence[bytes | None]) -> JsonScan:
        """The messages it is sure of, as a batch; the indices of the others."""
        n = len(values)
        if not self.usable:
            return self._none_sure(n)
        try:
            joined = b"".join(values)  # type: ignore[arg-type]
            lengths = list(map(len, values))  # type: ignore[arg-type]
        except TypeError:  # a tombstone (None): the careful path names it
            joined = b"".join(v if isinstance(v, bytes) else b"" for v in values)
            lengths = [len(v) if isinstance(v, bytes) else 0 for v in values]
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        inputs = self.inputs
        d, k = len(inputs.numeric), len(inputs.categorical)
        out = (np.empty((n, d)), np.empty(n), np.empty((n, k), dtype=np.int64),
               np.empty((n, k), dtype=np.int8), np.empty((n, k, 2), dtype=np.int64),
               np.empty(n, dtype=np.int8), np.empty(n, dtype=np.int64),
               np.empty((n, 2), dtype=np.int64), np.empty((n * (d + 1), 4), dtype=np.int64),
               np.zeros(1, dtype=np.int64))
        careful = np.empty(n, dtype=np.bool_)
        _scan(np.frombuffer(joined or b"\0", dtype=np.uint8), starts, self._tables, out,
              careful, np.full(len(self._next) - 1, -1, dtype=np.int64), self._next,
              np.empty(MAX_DEPTH, dtype=np.int8))
        num, lab, hashed, cat_kind, cat_span, id_kind, id_val, id_span, hard, n_hard = out
        if n_hard[0]:
            self._read_hard(joined, hard[: n_hard[0]], num, lab, careful)
        if not joined.isascii():
            # strings were skipped byte by byte: the ones orjson would refuse (bad UTF-8)
            for r in np.flatnonzero(~careful).tolist():
                v = bytes(values[r])  # type: ignore[arg-type]  # any bytes-like value
                if not v.isascii():
                    try:
                        v.decode()
                    except UnicodeDecodeError:
                        careful[r] = True
        sure = np.flatnonzero(~careful)
        if sure.size < n:
            num, lab, hashed, cat_kind, cat_span, id_kind, id_val, id_span = (
                a[sure] for a in (num, lab, hashed, cat_kind, cat_span, id_kind, id_val, id_span))
        for r, m in np.argwhere(cat_kind == _ESC).tolist():
            a, b = cat_span[r, m].tolist()
            hashed[r, m] = self.vectorizer.slot(inputs.categorical[m], orjson.loads(joined[a:b]))
        ids = self._ids(joined, id_kind, id_val, id_span)
        with np.errstate(over="ignore"):  # labels are bounded by then
            labels = lab.astype(np.float32)
        aux = None
        if inputs.time is None:
            numeric = num
        else:  # aggregate columns stay NaN until the model fills them from ``aux``
            spec = self.spec
            numeric = np.full((len(sure), spec.n_numeric), np.nan)
            numeric[:, : len(spec.numeric)] = num[:, : len(spec.numeric)]
            hashed = np.ascontiguousarray(hashed[:, : len(spec.categorical)])  # + entities
            aux = AggregateInputs(
                np.ascontiguousarray(num[:, inputs.time]),
                np.ascontiguousarray(num[:, list(inputs.values)]),
                [_values(joined, cat_kind[:, j], cat_span[:, j]) for j in inputs.entities])
        batch = FeatureBatch(numeric, hashed, labels, ids, aux)
        return JsonScan(batch, sure, np.flatnonzero(careful))

    def _read_hard(self, joined: bytes, hard: np.ndarray, num: np.ndarray, lab: np.ndarray,
                   careful: np.ndarray) -> None:
        """The numbers the compiled conversion left to ``float``, and the rules the scan
        checks on the others: a magnitude past the bound, a binary label other than 0 or 1.
        (A row whose event time is one of them is careful already.)"""
        for r, m, a, b in hard.tolist():
            x = float(joined[a:b])
            if m < 0:
                lab[r] = x
            else:
                num[r, m] = x
        rows = np.unique(hard[:, 0])
        wrong = (np.abs(num[rows]) > MAX_ABS_VALUE).any(axis=1)  # NaN (missing) is no match
        wrong |= np.abs(lab[rows]) > MAX_ABS_VALUE
        if self.spec.task != "regression":
            y = lab[rows]
            wrong |= ~((y == 0.0) | (y == 1.0) | np.isnan(y))
        careful[rows[wrong]] = True

    def _none_sure(self, n: int) -> JsonScan:
        spec = self.spec
        empty = FeatureBatch(np.empty((0, spec.n_numeric)),
                             np.empty((0, len(spec.categorical)), dtype=np.int64),
                             np.empty(0, dtype=np.float32), [])
        return JsonScan(empty, np.empty(0, dtype=np.int64), np.arange(n))

    @staticmethod
    def _ids(joined: bytes, kind: np.ndarray, ints: np.ndarray, span: np.ndarray) -> list[Any]:
        """The sure rows' ids: integers, strings or None, as orjson reads them."""
        if (kind == _INT).all():  # the usual producer: integer ids
            return ints.tolist()
        return _values(joined, kind, span, ints)


def _values(joined: bytes, kind: np.ndarray, span: np.ndarray,
            ints: np.ndarray | None = None) -> list[Any]:
    """Python values (None, int, str) of a string-or-integer field, one per row."""
    out: list[Any] = []
    ints_ = ints.tolist() if ints is not None else None
    for r, (k, (a, b)) in enumerate(zip(kind.tolist(), span.tolist(), strict=True)):
        if k == _STR:
            out.append(joined[a:b].decode())
        elif k == _ESC:
            out.append(orjson.loads(joined[a:b]))
        elif k == _INT:
            out.append(ints_[r] if ints_ is not None else int(joined[a:b]))
        else:
            out.append(None)
    return out
