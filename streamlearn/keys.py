"""Lists of JSON scalars (event ids, entity keys) as two arrays, for snapshots.

A snapshot keeps its arrays out of the JSON metadata block, which is bounded (4 MiB),
so a hundred thousand pending event ids or entity keys travel as one ``uint8`` array of
their JSON texts plus an ``int64`` array of where each ends.

>>> packed = pack_keys(["card-1", 7, None, 2.5])
>>> unpack_keys(packed)
['card-1', 7, None, 2.5]
>>> unpack_keys(pack_keys([]))
[]
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import orjson

#: Longest key kept as it is (event ids are refused past 256 characters); a longer entity
#: value is kept as a digest (:func:`bounded`), so a packed key takes at most
#: ``MAX_KEY_BYTES`` (256 characters JSON-escaped, 6 bytes each at worst).
MAX_KEY_CHARS = 256
MAX_KEY_BYTES = 6 * MAX_KEY_CHARS + 2


def bounded(key: Any) -> Any:
    """``key``, or for a string past :data:`MAX_KEY_CHARS` a 32-hex-digit digest of it.

    >>> bounded("card-1"), len(bounded("x" * 1000))
    ('card-1', 33)
    """
    if isinstance(key, str) and len(key) > MAX_KEY_CHARS:
        return "#" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                     digest_size=16).hexdigest()
    return key


#: The texts travel in pieces of at most this many bytes, so that no snapshot array is
#: larger than the model's other arrays need (a decoder bounds each array's size).
TEXT_CHUNK = 1 << 20


def pack_keys(keys: list[Any]) -> dict[str, Any]:
    """``{"text": [uint8 pieces of the JSON texts], "ends": int64 end offsets}``."""
    return pack_texts(list(map(orjson.dumps, keys)))


def pack_texts(texts: list[bytes]) -> dict[str, Any]:
    """:func:`pack_keys` of keys already written as JSON (``orjson.dumps`` each)."""
    ends = np.cumsum([len(t) for t in texts], dtype=np.int64) if texts else np.zeros(
        0, dtype=np.int64)
    joined = b"".join(texts)
    pieces = [np.frombuffer(joined[i : i + TEXT_CHUNK], dtype=np.uint8).copy()
              for i in range(0, len(joined), TEXT_CHUNK)]
    return {"text": pieces, "ends": ends}


def unpack_keys(packed: Any) -> list[Any]:
    """The keys :func:`pack_keys` packed; ``ValueError`` for anything malformed."""
    try:
        pieces = packed["text"]
        if not isinstance(pieces, list):
            raise TypeError("text is not a list of pieces")
        text = b"".join(np.asarray(p, dtype=np.uint8).tobytes() for p in pieces)
        ends = np.asarray(packed["ends"], dtype=np.int64)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"packed keys lack a field: {exc}") from exc
    if ends.ndim != 1 or (len(ends) and (ends[-1] != len(text) or (np.diff(ends) < 0).any()
                                         or ends[0] < 0)):
        raise ValueError("packed keys: bad end offsets")
    n = len(ends)
    if not n:
        if text:
            raise ValueError("packed keys: text without keys")
        return []
    # One JSON array, "[" k0 "," k1 ... "]", parsed in one call: each key's text shifted
    # right by the commas before it (a text that is not one JSON scalar then fails the
    # parse, or the count, or the scalar check below).
    raw = np.frombuffer(text, dtype=np.uint8)
    joined = np.full(len(raw) + n + 1, ord(","), dtype=np.uint8)
    starts = np.concatenate(([0], ends[:-1]))
    if ((ends - starts) <= 0).any():
        raise ValueError("packed keys: an empty key text")
    at = np.arange(len(raw))
    joined[at + np.searchsorted(ends, at, side="right") + 1] = raw
    joined[0], joined[-1] = ord("["), ord("]")
    try:
        out = orjson.loads(joined.tobytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"packed keys: {exc}") from exc
    if len(out) != n or any(isinstance(k, dict | list) for k in out):
        raise ValueError("packed keys: texts that are not one JSON scalar each")
    return out  # type: ignore[no-any-return]
