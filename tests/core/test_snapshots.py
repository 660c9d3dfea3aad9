import struct
import tracemalloc
import zlib

import numpy as np
import orjson
import pyarrow as pa
import pytest

from streamlearn import snapshots
from streamlearn.models import OnlineModel, StateError
from streamlearn.synthetic import FraudStream


def _trained(spec, n=3000):
    model = OnlineModel(spec, device="cpu")
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=1).take(n))
    for i in range(0, n, 256):
        model.process(batch.take(np.arange(i, min(i + 256, n))))
    model.offsets = {"transactions:0": 1234, "transactions:3": 99}
    return model


def test_model_round_trips_exactly(fraud_spec):
    model = _trained(fraud_spec)
    state = snapshots.decode(snapshots.encode(model.to_state()))
    restored = OnlineModel.from_state(state)
    for name in ("w", "s1", "s2"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(model, name))
    np.testing.assert_array_equal(restored.scaler.m2, model.scaler.m2)
    assert restored.offsets == model.offsets
    assert (restored.version, restored.step, restored.n_seen) == (
        model.version,
        model.step,
        model.n_seen,
    )
    assert restored.metrics.report() == model.metrics.report()
    events = FraudStream(seed=9).take(100)
    np.testing.assert_array_equal(restored.predict_events(events), model.predict_events(events))


def test_hashed_weights_are_stored_sparse(fraud_spec):
    model = _trained(fraud_spec)
    dense_bytes = 3 * model.w.nbytes
    payload = snapshots.encode(model.to_state(), fmt=1)  # format 1: zlib, easy to open
    raw = zlib.decompress(payload[struct.calcsize("<6sHI"):])
    meta = orjson.loads(raw[4 : 4 + struct.unpack_from("<I", raw)[0]])
    assert all("sparse" in meta["weights"][k]["__nd__"] for k in ("w", "s1", "s2"))
    assert len(payload) < dense_bytes / 2
    assert len(snapshots.encode(model.to_state())) < dense_bytes / 2  # format 2 (zstd)


def test_both_formats_round_trip_and_format_2_is_written(fraud_spec):
    state = _trained(fraud_spec).to_state()
    for fmt in (1, 2):
        payload = snapshots.encode(state, fmt=fmt)
        assert struct.unpack_from("<6sHI", payload)[1] == fmt
        out = snapshots.decode(payload)
        np.testing.assert_array_equal(out["weights"]["w"], state["weights"]["w"])
    assert struct.unpack_from("<6sHI", snapshots.encode(state))[1] == snapshots.FORMAT_VERSION == 2


def test_a_zstd_bomb_is_refused_before_it_is_inflated():
    """Format 2 declares its sizes: a frame that inflates past them is never inflated."""
    zstd = pa.Codec("zstd", compression_level=1)
    meta = orjson.dumps({"a": {"__nd__": {"dtype": "<f4", "shape": [25], "offset": 0,
                                          "end": 100}}})
    zmeta = zstd.compress(meta, asbytes=True)
    for declared in (100, 10**12):
        body = (struct.pack("<IIQ", len(meta), len(zmeta), declared) + zmeta
                + zstd.compress(bytes(100_000_000), asbytes=True))
        payload = struct.pack("<6sHI", snapshots.MAGIC, 2, zlib.crc32(body)) + body
        with pytest.raises(snapshots.SnapshotError) as err:
            snapshots.decode(payload, limits=snapshots.Limits(max_decoded_bytes=2**20))
        assert err.value.reason in ("undecodable", "too_large")


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"XXXXXX" + b[6:], "bad magic"),
        (lambda b: b[:-10], "checksum mismatch"),
        (lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:], "checksum mismatch"),
        (lambda b: b[:4], "too short"),
        (lambda b: b[:6] + (99).to_bytes(2, "little") + b[8:], "newer than supported"),
    ],
)
def test_corrupt_payloads_are_refused_clearly(fraud_spec, mangle, message):
    payload = snapshots.encode(_trained(fraud_spec, 300).to_state())
    with pytest.raises(snapshots.SnapshotError, match=message):
        snapshots.decode(mangle(payload))


def test_foreign_state_is_refused():
    with pytest.raises(StateError, match="not a streamlearn model state"):
        OnlineModel.from_state(snapshots.decode(snapshots.encode({"kind": "other"})))
    with pytest.raises(StateError, match="missing or has a bad field"):
        OnlineModel.from_state({"kind": "streamlearn.model", "state_version": 1})


def _forge(state, part, name, value):
    """``state`` with ``state[part][name]`` (or ``state[part]``) replaced, deep enough."""
    forged = dict(state)
    if name is None:
        forged[part] = value
    else:
        forged[part] = dict(state[part], **{name: value})
    return forged


@pytest.mark.parametrize(("part", "name", "mangle", "message"), [
    ("weights", "w", lambda a: np.where(np.arange(a.size) == 3, np.nan, a), "NaN, infinite"),
    ("weights", "s2", lambda a: a - 1.0, "negative"),
    ("weights", "avg", lambda a: np.where(np.arange(a.size) == a.size - 1, np.inf, a),
     "infinite"),
    ("scaler", "mean", lambda a: a[:2], "differ in shape"),
    ("scaler", None, lambda sc: {k: np.asarray(v)[:1] for k, v in sc.items()}, "spec's shape"),
    ("target", None, lambda a: np.array([10.0, np.nan, 1.0, 0.0]), "not finite"),
    ("target", None, lambda a: np.array([-5.0, 0.5, 1.0, 0.0]), "not finite"),
    ("mix", None, lambda a: np.array([np.inf]), "finite"),
])
def test_a_snapshot_the_model_cannot_use_is_refused(fraud_spec, part, name, mangle, message):
    """The worker restores snapshots from disk and the models topic: a state whose
    statistics are not finite, or shorter than the spec's (the compiled step reads them
    unchecked: a one-feature scaler corrupted the heap, seen), is refused, never
    restored into a model that scores NaN or crashes."""
    state = _trained(fraud_spec, 600).to_state()
    value = state[part] if name is None else state[part][name]
    forged = _forge(state, part, name, mangle(value if isinstance(value, dict)
                                              else np.asarray(value)))
    with pytest.raises(StateError, match=message):
        OnlineModel.from_state(forged)
    OnlineModel.from_state(_forge(state, part, name, value))  # the state as it was: fine


def test_atomic_save_leaves_no_temp_files(tmp_path, fraud_spec):
    payload = snapshots.encode(_trained(fraud_spec, 300).to_state())
    path = tmp_path / "a" / "m.snap"
    snapshots.save(path, payload)
    snapshots.save(path, payload)
    assert [p.name for p in path.parent.iterdir()] == ["m.snap"]
    assert snapshots.load(path)["version"] == OnlineModel.from_state(snapshots.load(path)).version


# -- hostile payloads: every one is a SnapshotError with a reason, never another error ---


def _craft(meta: bytes, blob: bytes = b"", trailer: bytes = b"", level: int = 6) -> bytes:
    """A payload with a valid header and CRC around arbitrary metadata and array bytes."""
    body = zlib.compress(struct.pack("<I", len(meta)) + meta + blob + trailer, level)
    return struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body


def _nd(**desc):
    return orjson.dumps({"w": {"__nd__": desc}})


@pytest.mark.parametrize(
    "payload, reason",
    [
        (_craft(orjson.dumps({"w": {"__nd__": {}}})), "bad_array"),  # the 58-byte KeyError
        (_craft(_nd(dtype="|O", shape=[1], offset=0, end=8), bytes(8)), "bad_array"),
        (_craft(_nd(dtype="|V8", shape=[1], offset=0, end=8), bytes(8)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape=[-1], offset=0, end=4), bytes(4)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape="3", offset=0, end=12), bytes(12)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape=[3], offset=0, end=4), bytes(4)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape=[1] * 5, offset=0, end=4), bytes(4)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape=[4], offset=0, end=16)), "truncated"),
        (_craft(_nd(dtype="<f4", shape=[4], offset=0, end=16, sparse=["<u4", 9]),
                bytes(72)), "bad_array"),
        (_craft(_nd(dtype="<f4", shape=[4], offset=0, end=8, sparse=["<u4", 1]),
                np.array([7], dtype="<u4").tobytes() + bytes(4)), "bad_array"),
        (_craft(b"[1, 2]"), "undecodable"),
        (_craft(b"{not json"), "undecodable"),
        (_craft(b"{}", trailer=b"x"), "too_large"),
        (struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(b"junk")) + b"junk", "undecodable"),
    ],
)
def test_crafted_payloads_are_refused_with_a_reason(payload, reason):
    with pytest.raises(snapshots.SnapshotError) as info:
        snapshots.decode(payload)
    assert info.value.reason == reason, info.value


def test_declared_sizes_are_checked_before_anything_is_allocated():
    # 2**31 float64 elements (16 GiB) declared; the body holds none of them.
    huge = _craft(_nd(dtype="<f8", shape=[2**31], offset=0, end=8 * 2**31))
    tracemalloc.start()
    try:
        with pytest.raises(snapshots.SnapshotError) as info:
            snapshots.decode(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large" and peak < 1 << 20
    big_meta = struct.pack("<I", 2**31) + b"{}"
    body = zlib.compress(big_meta)
    payload = struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body
    with pytest.raises(snapshots.SnapshotError, match="metadata of"):
        snapshots.decode(payload)
    limits = snapshots.Limits(max_array_elements=10)
    with pytest.raises(snapshots.SnapshotError, match="larger than the model allows"):
        snapshots.decode(_craft(_nd(dtype="<f4", shape=[11], offset=0, end=44), bytes(44)),
                         limits=limits)


def test_a_decompression_bomb_costs_at_most_the_limit():
    # ~200 KB that inflates to 200 MB of zeros after a valid, tiny state.
    zeros = zlib.compressobj(9)
    parts = [zeros.compress(struct.pack("<I", 2) + b"{}")]
    chunk = bytes(1 << 20)
    parts += [zeros.compress(chunk) for _ in range(200)]
    body = b"".join(parts) + zeros.flush()
    bomb = struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(snapshots.SnapshotError) as info:
            snapshots.decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 4 << 20, peak  # the bomb is never inflated beyond what was declared
    with pytest.raises(snapshots.SnapshotError, match="over the limit"):
        snapshots.decode(bomb, limits=snapshots.Limits(max_payload_bytes=1000))


def test_truncations_and_bit_flips_never_escape_as_other_errors(fraud_spec):
    payload = snapshots.encode(_trained(fraud_spec, 600).to_state())
    rng = np.random.default_rng(3)
    for cut in rng.integers(0, len(payload), 40):
        with pytest.raises(snapshots.SnapshotError):
            snapshots.decode(payload[:cut])
    # Flip bytes inside the compressed body and fix the CRC: the parser sees garbage.
    header = struct.calcsize("<6sHI")
    for pos in rng.integers(header, len(payload), 60):
        body = bytearray(payload[header:])
        body[pos - header] ^= 0x5A
        forged = struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + bytes(body)
        try:
            snapshots.decode(forged)
        except snapshots.SnapshotError:
            pass


def test_signed_snapshots_round_trip_and_forgeries_are_refused(fraud_spec):
    payload = snapshots.encode(_trained(fraud_spec, 300).to_state())
    signed = snapshots.sign(payload, "k" * 32, context="fraud/r1")
    assert snapshots.decode(signed, key="k" * 32, context="fraud/r1")["version"] >= 1
    cases = [
        (signed, "x" * 32, "fraud/r1", "bad_signature"),  # wrong key
        (signed, "k" * 32, "fraud/evil", "bad_signature"),  # replayed under another key
        (payload, "k" * 32, "fraud/r1", "unsigned"),  # unsigned while a key is set
        (signed[:20], "k" * 32, "fraud/r1", "truncated"),
        (signed[:-1] + bytes([signed[-1] ^ 1]), "k" * 32, "fraud/r1", "bad_signature"),
    ]
    for value, key, context, reason in cases:
        with pytest.raises(snapshots.SnapshotError) as info:
            snapshots.decode(value, key=key, context=context)
        assert info.value.reason == reason
    # Without a key a signed payload is read unverified, unless signatures are required.
    assert snapshots.decode(signed)["version"] >= 1
    with pytest.raises(snapshots.SnapshotError, match="no key"):
        snapshots.decode(signed, require_signature=True)
