"""The compiled JSON reader: what it is sure of equals orjson plus the Python rules, and
everything else is left to the careful path.

``tests/core/test_validation.py`` runs the reader inside ``JsonDecoder`` on random and
adversarial streams; these tests pin down each kind of field and each kind of doubt.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from streamlearn.config import AggregateSpec, ModelSpec
from streamlearn.features import Vectorizer
from streamlearn.json_columns import MAX_DEPTH, JsonColumns

SPEC = ModelSpec(name="m", topic="t", numeric=("a", "b"), categorical=("k", "j"), label="y",
                 hash_bits=12)


def read(values: list[bytes | None], spec: ModelSpec = SPEC) -> Any:
    return JsonColumns(Vectorizer(spec)).read(values)


def assert_same_as_dicts(values: list[bytes], spec: ModelSpec = SPEC) -> None:
    """Every message read for sure, with the values orjson + the vectorizer give."""
    scan = read(values, spec)
    assert scan.careful.tolist() == []
    want, rejects = Vectorizer(spec).transform_many([orjson.loads(v) for v in values])
    assert rejects == []
    np.testing.assert_array_equal(scan.batch.numeric, want.numeric)
    np.testing.assert_array_equal(scan.batch.labels, want.labels)
    np.testing.assert_array_equal(scan.batch.hashed, want.hashed)
    assert scan.batch.ids == want.ids
    assert [type(i) for i in scan.batch.ids] == [type(i) for i in want.ids]


def test_every_kind_of_value_it_reads() -> None:
    assert_same_as_dicts([
        b'{"event_id": 1, "a": 1.5, "b": -2, "k": "x", "j": 7, "y": 1}',
        b'{}',
        b' \t\r\n{ "a" : 0 , "b":null,"k":null ,"j": -9223372036854775808 }\n ',
        b'{"event_id": "e-2", "k": "Z\xc3\xbcrich", "j": "\xe6\x9d\xb1\xe4\xba\xac", "y": 0}',
        b'{"event_id": "e\\"3", "k": "Z\\u00fcrich", "j": "\\ud83d\\ude00 \\n\\t\\/"}',
        b'{"event_id": null, "a": -0.0, "b": 1e-3, "j": 9223372036854775807, "y": null}',
        b'{"event_id": -9223372036854775808, "a": 1E+2, "b": 0.000001234}',
        b'{"k": "", "a": 1000000000000000, "b": -1e15}',
        # past 19 digits: Python's float reads them, and the rules are checked on them too
        b'{"y": 1.000000000000000000000001, "a": 0.1000000000000000000000001, "b": 1e-400}',
    ])


def test_it_checks_and_skips_fields_the_spec_does_not_read() -> None:
    nested = b"[" * (MAX_DEPTH - 2) + b'{"q": [true, false, null, -1.5e-7]}' + b"]" * (
        MAX_DEPTH - 2)
    assert_same_as_dicts([
        b'{"extra": {"x": [1, 2, {"y": "z"}], "e": {}, "f": []}, "a": 1}',
        b'{"note": "tab\\t quote\\" slash\\/ \\u00e9 \\ud83d\\ude00 '
        b'back\\\\", "a": 2}',
        b'{"deep": ' + nested + b', "a": 3}',
        b'{"big": 123456789012345678901234567890, "tiny": 1e-999, "a": 4}',
        b'{"ok": true, "no": false, "none": null, "a": 5, "s": "\xf0\x9f\x98\x80"}',
    ])


@pytest.mark.parametrize("message", [
    b'{"\\u0061": 1}',  # an escaped key may spell a field the spec reads
    b'{"a": 1, "a": 2}',  # a repeated key: orjson keeps the last one
    b'{"extra": ' + b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2) + b', "a": 1}',
    b'{"extra": "\\ud800", "a": 1}',  # an escaped lone surrogate
    b'{"extra": "\\udc00\\ud800", "a": 1}', b'{"k": "\\ud83d\\u0041"}', b'{"k": "\\x"}',
    b'{"extra": "\xc3", "a": 1}',  # not UTF-8
    b'{"a": true}', b'{"a": "1"}', b'{"a": [1]}', b'{"a": {}}',
    b'{"k": 1.5}', b'{"k": 1e2}', b'{"k": true}', b'{"k": -0}', b'{"k": 9223372036854775808}',
    b'{"event_id": 1.0}', b'{"event_id": [1]}', b'{"event_id": 18446744073709551616}',
    b'{"a": 1e16}', b'{"a": -1000000000000000.1}', b'{"y": 2}', b'{"y": 0.5}',
    b'{"a": 10000000000000000000000}', b'{"y": 0.5000000000000000000001}', b'{"b": 1e400}',
    b'{"a": 01}', b'{"a": 1.}', b'{"a": .5}', b'{"a": -}', b'{"a": 1e}', b'{"a": +1}',
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": nul}', b'{"a": 1,}', b'{"a" 1}', b"{'a': 1}",
    b'{"s": "a\x01b"}', b'{"a": 1', b'{"a": 1}}', b'{"a": 1} x', b'\xef\xbb\xbf{"a": 1}',
    b"[]", b"1", b'"x"', b"null", b"", None,
], ids=repr)
def test_what_it_is_not_sure_of_goes_the_careful_way(message: bytes | None) -> None:
    good = b'{"event_id": 1, "a": 1}'
    scan = read([good, message, good])
    assert scan.careful.tolist() == [1]
    assert scan.sure.tolist() == [0, 2] and scan.batch.numeric[:, 0].tolist() == [1.0, 1.0]


def _tokens(rng: random.Random) -> list[str]:
    """Number tokens as producers write them, and ones the compiled conversion declines."""
    out = ["0", "-0", "-0.0", "0e5", "1", "-1", "0.1", "0.3", "1e23", "5e-324",
           "2.2250738585072011e-308", "4.9406564584124654e-324", "9007199254740993",
           "1.00000000000000011102230246251565404236316680908203125",
           "123456789012345678901234", "0.000000000000000000000000000001",
           "999999999999999.9", "1000000000000000", "-1000000000000000", "1E+2", "1e-2"]
    for _ in range(3000):
        x = rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 15)
        out += [repr(x), f"{x:.3f}", f"{x:.20e}", json.dumps(rng.randrange(-10**15, 10**15))]
    return out


def test_numbers_are_python_floats_of_their_tokens() -> None:
    tokens = _tokens(random.Random(5))
    scan = read([b'{"a": %s}' % t.encode() for t in tokens])
    want = [float(t) for t in tokens]
    sure = [w for w in want if abs(w) <= 1e15]
    assert scan.careful.size == len(want) - len(sure)
    got = scan.batch.numeric[:, 0].tolist()
    # bit for bit: -0.0 keeps its sign, and no value is off by one unit in the last place
    assert [struct.pack("<d", g) for g in got] == [struct.pack("<d", w) for w in sure]


def test_categories_hash_like_the_vectorizer() -> None:
    rng = random.Random(2)
    alphabet = "abcXYZ019 _-|/é東😀"
    values: list[Any] = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
                         for _ in range(500)]
    values += [rng.randrange(-(2**63), 2**63) for _ in range(200)] + [0, -1, 2**63 - 1]
    messages = [json.dumps({"k": v, "j": str(v), "event_id": str(v)}, ensure_ascii=ascii).encode()
                for v in values for ascii in (False, True)]  # "é", or escaped: "\u00e9"
    assert_same_as_dicts(messages)


def test_aggregate_inputs_are_the_dict_paths() -> None:
    spec = ModelSpec(name="m", topic="t", numeric=("amount",), categorical=("shop",),
                     label="y", hash_bits=8,
                     aggregates=(AggregateSpec("card", "amount", ("1m",), ("count", "sum")),
                                 AggregateSpec("shop", "fee", ("1m",), ("sum",))))
    events = [{"event_id": i, "ts": 1700000000.0 + i, "amount": i * 1.5, "fee": 0.25,
               "card": [f"c{i % 3}", i % 3, None][i % 3], "shop": ["s", 7][i % 2], "y": i % 2}
              for i in range(30)]
    scan = read([orjson.dumps(e) for e in events], spec)
    want, _ = Vectorizer(spec).transform_many(events)
    assert scan.careful.tolist() == []
    np.testing.assert_array_equal(scan.batch.numeric, want.numeric)
    np.testing.assert_array_equal(scan.batch.hashed, want.hashed)
    assert scan.batch.aux is not None and want.aux is not None
    np.testing.assert_array_equal(scan.batch.aux.times, want.aux.times)
    np.testing.assert_array_equal(scan.batch.aux.values, want.aux.values)
    assert scan.batch.aux.keys == want.aux.keys
    # an event without its time is the careful path's to reject
    assert read([b'{"amount": 1}'], spec).careful.tolist() == [0]


def test_any_bytes_like_value() -> None:
    values: list[Any] = [bytearray(b'{"k": "\xc3\xa9", "a": 1}'), memoryview(b'{"a": 2}'),
                         memoryview(b'{"k": "\xc3"}'), b'{"a": 3}']
    scan = read(values)
    assert scan.careful.tolist() == [2] and scan.batch.numeric[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_no_messages() -> None:
    scan = read([])
    assert len(scan.batch) == 0 and scan.batch.numeric.shape == (0, 2)
    assert scan.sure.size == scan.careful.size == 0


def test_a_spec_that_reads_one_name_twice_leaves_all_to_the_careful_path() -> None:
    odd = ModelSpec(name="m", topic="t", numeric=("y",), label="y", hash_bits=4)
    scan = read([b'{"y": 1}', b'{"y": 0}'], odd)
    assert scan.careful.tolist() == [0, 1] and len(scan.batch) == 0
