"""Framing, chunking and reassembly (pure; no broker)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq_protocol.chunking import (
    CHUNK_KEY,
    CHUNK_OVERHEAD,
    MANIFEST_KEY,
    Reassembler,
    frame_payload,
    pack_chunk,
    split_chunk_topic,
)
from fedmq_protocol.errors import ProtocolError

TOPIC = "fedmq/fed/global"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(max_message=1 << 22, max_pending=1 << 22, timeout=60.0, **kw) -> Reassembler:
    return Reassembler(max_message, max_pending, timeout, **kw)


def feed_all(r: Reassembler, frames, topic=TOPIC):
    return [out for suffix, frame in frames if (out := r.feed(topic + suffix, frame)) is not None]


def manifest_frame(**fields) -> bytes:
    return msgpack.packb({MANIFEST_KEY: 1, **fields}, use_bin_type=True)


def good_manifest_fields(payload: bytes, chunk_size: int) -> dict:
    frames = frame_payload(payload, chunk_size)
    return msgpack.unpackb(frames[-1][1], raw=False)


# -- framing ---------------------------------------------------------------------------------


def test_small_payload_is_the_message_itself():
    message = msgpack.packb({"schema": 1, "kind": "fit"})
    frames = frame_payload(message, 1024)
    assert frames == [("", message)]
    assert make().feed(TOPIC, frames[0][1]) == (TOPIC, message)
    assert make().feed(TOPIC, b"hello") == (TOPIC, b"hello")  # not a manifest: handed on as is


def test_large_payload_chunks_first_manifest_last():
    payload = os.urandom(10_000)
    frames = frame_payload(payload, 1024)
    assert [s for s, _ in frames] == [f"/c/{i}" for i in range(10)] + [""]
    chunks = [msgpack.unpackb(f, raw=False) for _, f in frames[:-1]]  # every payload is plain msgpack
    assert [c[CHUNK_KEY] for c in chunks] == list(range(10))
    assert b"".join(c["data"] for c in chunks) == payload
    assert all(len(f) <= 1024 + CHUNK_OVERHEAD for _, f in frames)
    m = msgpack.unpackb(frames[-1][1], raw=False)
    assert next(iter(m)) == MANIFEST_KEY and m[MANIFEST_KEY] == 1
    assert m["size"] == 10_000 and m["chunks"] == 10 and m["chunk_size"] == 1024
    assert m["sha256"] == hashlib.sha256(payload).digest() and len(m["transfer"]) == 16
    assert {c["transfer"] for c in chunks} == {m["transfer"]}
    assert m["chunk_sha256"] == [hashlib.sha256(c["data"]).digest() for c in chunks]


def test_chunk_overhead_bounds_the_largest_chunk_header():
    assert len(pack_chunk(b"\xff" * 16, 0xFFFFFFFF, b"x" * 70_000)) == 70_000 + CHUNK_OVERHEAD


def test_retired_0xfd_framing_is_refused_with_its_reason():
    for topic, frame in ((TOPIC, b"\xfdW\x80"), (TOPIC, b"\xfdM\x80"), (TOPIC + "/c/0", b"\xfdC" + bytes(30))):
        with pytest.raises(ProtocolError, match="retired 0xFD framing"):
            make().feed(topic, frame)


def test_manifest_that_would_not_fit_a_chunk_is_refused():
    with pytest.raises(ValueError, match="larger chunk_size"):
        frame_payload(b"x" * 100_000, 1024)


def test_split_chunk_topic():
    assert split_chunk_topic("a/b/c/12") == ("a/b", 12)
    assert split_chunk_topic("a/b") == ("a/b", None)
    assert split_chunk_topic("a/b/c/x") == ("a/b/c/x", None)
    assert split_chunk_topic("a/c/01") == ("a/c/01", None)


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(min_size=1, max_size=6000),  # b"" is a retained clear, not a message
    chunk_size=st.integers(min_value=256, max_value=4096),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    dup_factor=st.integers(min_value=0, max_value=3),
)
def test_any_order_with_duplicates_reassembles_exactly_once(payload, chunk_size, seed, dup_factor):
    frames = frame_payload(payload, chunk_size)
    rng = random.Random(seed)
    stream = list(frames)
    for _ in range(dup_factor):
        stream += rng.sample(frames, k=rng.randint(0, len(frames)))
    rng.shuffle(stream)
    r = make()
    outs = feed_all(r, stream)
    if len(frames) == 1:
        # WHOLE frames carry no transfer id: every copy is delivered (handlers are idempotent).
        assert outs == [(TOPIC, payload)] * len(stream)
        return
    assert outs == [(TOPIC, payload)]
    assert r.completed == 1 and r.rejected == 0
    assert r.pending_bytes == 0 and r.pending_transfers == 0
    # Replaying the whole stream later changes nothing.
    assert feed_all(r, stream) == []


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1500, max_size=5000), min_size=2, max_size=4),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_interleaved_transfers_on_different_topics(payloads, seed):
    stream = []
    for i, p in enumerate(payloads):
        stream += [(f"t/{i}" + s, f) for s, f in frame_payload(p, 512)]
    random.Random(seed).shuffle(stream)
    r = make()
    outs = [o for t, f in stream if (o := r.feed(t, f)) is not None]
    assert sorted(outs) == sorted((f"t/{i}", p) for i, p in enumerate(payloads))


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(min_size=0, max_size=300), topic_index=st.integers(0, 3))
def test_garbage_raises_protocol_error_only(garbage, topic_index):
    r = make()
    topic = TOPIC if topic_index == 0 else f"{TOPIC}/c/{topic_index}"
    manifest_prefix = msgpack.packb({MANIFEST_KEY: 1})[:-1] + b"\x01"  # a map header, its first key
    chunk_prefix = b"\x83" + msgpack.packb(CHUNK_KEY)
    for frame in (garbage, b"\x87" + msgpack.packb(MANIFEST_KEY) + garbage, manifest_prefix + garbage,
                  chunk_prefix + garbage, b"\xfdW" + garbage):
        with contextlib.suppress(ProtocolError):
            r.feed(topic, frame)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), seed=st.integers(0, 1000))
def test_truncated_frames_raise_protocol_error_only(cut, seed):
    frames = frame_payload(random.Random(seed).randbytes(3000), 1024)
    r = make()
    for suffix, frame in frames:
        with contextlib.suppress(ProtocolError):
            r.feed(TOPIC + suffix, frame[: cut % (len(frame) + 1)])
    assert r.completed == 0 or r.pending_bytes == 0


# -- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest_first", [False, True])
def test_corrupted_chunk_is_rejected(manifest_first):
    payload = os.urandom(5000)
    frames = frame_payload(payload, 1024)
    suffix, frame = frames[2]
    bad = bytearray(frame)
    bad[-1] ^= 0xFF
    r = make()
    order = [frames[-1], *frames[:-1]] if manifest_first else frames
    outs = []
    with pytest.raises(ProtocolError, match="SHA-256"):
        for s, f in order:
            outs.append(r.feed(TOPIC + s, bytes(bad) if s == suffix else f))
    assert not any(outs)
    assert r.rejected == 1
    # A good copy of the chunk (e.g. a QoS 1 re-send) still completes the transfer.
    outs = [r.feed(TOPIC + s, f) for s, f in order]  # replay with the good chunk
    assert [o for o in outs if o] == [(TOPIC, payload)]


def test_chunk_with_wrong_topic_index_rejected():
    frames = frame_payload(os.urandom(3000), 1024)
    with pytest.raises(ProtocolError, match="does not match"):
        make().feed(TOPIC + "/c/1", frames[0][1])


def test_chunk_frame_on_plain_topic_and_manifest_on_chunk_topic_rejected():
    frames = frame_payload(os.urandom(3000), 1024)
    r = make()
    with pytest.raises(ProtocolError, match="not a '<topic>/c/<index>' topic"):
        r.feed(TOPIC, frames[0][1])
    with pytest.raises(ProtocolError, match="chunk fields wrong"):
        r.feed(TOPIC + "/c/0", frames[-1][1])
    with pytest.raises(ProtocolError, match="chunk must be a map"):  # a whole message on a chunk topic
        r.feed(TOPIC + "/c/0", msgpack.packb([1, 2]))


def test_whole_payload_sha_mismatch_rejected():
    payload = os.urandom(3000)
    frames = frame_payload(payload, 1024)
    fields = msgpack.unpackb(frames[-1][1], raw=False)
    fields["sha256"] = b"\0" * 32  # same transfer id, bad whole digest
    r = make()
    for s, f in frames[:-1]:
        r.feed(TOPIC + s, f)
    with pytest.raises(ProtocolError, match="SHA-256"):
        r.feed(TOPIC, manifest_frame(**fields))


def test_bad_manifests_rejected():
    payload = os.urandom(3000)
    base = good_manifest_fields(payload, 1024)
    cases = [
        {**base, "chunks": 4},
        {**base, "transfer": b"short"},
        {**base, "transfer": "x" * 16},
        {**base, "chunk_sha256": base["chunk_sha256"][:2]},
        {**base, "chunk_sha256": [b"x"] * 3},
        {**base, "size": -1},
        {**base, "chunk_size": 0},
        {**base, "size": True},
        {**base, MANIFEST_KEY: 2},
        {**base, "extra": 1},
        {k: v for k, v in base.items() if k != "sha256"},
    ]
    for fields in cases:
        with pytest.raises(ProtocolError):
            make().feed(TOPIC, manifest_frame(**fields))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        make().feed(TOPIC, msgpack.packb({MANIFEST_KEY: 1, "size": 1})[:-1])


def test_bad_chunks_rejected():
    frames = frame_payload(os.urandom(3000), 1024)
    good = msgpack.unpackb(frames[0][1], raw=False)
    cases = [
        {**good, "transfer": b"short"},
        {**good, "data": b""},
        {**good, "data": "text"},
        {**good, CHUNK_KEY: -1},
        {**good, CHUNK_KEY: "0"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "data"},
    ]
    for fields in cases:
        with pytest.raises(ProtocolError):
            make().feed(TOPIC + "/c/0", msgpack.packb(fields, use_bin_type=True))


# -- bounds ------------------------------------------------------------------------------------


def test_manifest_over_limit_rejected_without_allocation():
    huge = 1 << 40
    n = 4
    fields = {
        "transfer": os.urandom(16),
        "size": huge,
        "chunk_size": huge // n,
        "chunks": n,
        "chunk_sha256": [b"\0" * 32] * n,
        "sha256": b"\0" * 32,
    }
    r = make(max_message=1 << 20)
    with pytest.raises(ProtocolError, match="limit"):
        r.feed(TOPIC, manifest_frame(**fields))
    assert r.pending_transfers == 0 and r.pending_bytes == 0 and r.rejected == 1


def test_manifest_over_pending_limit_rejected():
    payload = os.urandom(5000)
    frames = frame_payload(payload, 1024)
    r = make(max_message=1 << 20, max_pending=4096)
    with pytest.raises(ProtocolError, match="max_pending_bytes"):
        r.feed(TOPIC, frames[-1][1])


def test_pending_bytes_bounded_by_evicting_oldest():
    r = make(max_pending=10_000, max_message=10_000)
    payloads = [os.urandom(6000) for _ in range(3)]
    for i, p in enumerate(payloads):
        for s, f in frame_payload(p, 1024)[:4]:  # four chunks each, no manifest: orphans
            r.feed(f"t/{i}" + s, f)
            assert r.pending_bytes <= 10_000
    assert r.evicted >= 1
    assert r.pending_transfers <= 3


def test_max_transfers_bounded():
    r = make(max_transfers=4)
    for i in range(10):
        s, f = frame_payload(os.urandom(3000), 1024)[0]
        r.feed(f"t/{i}" + s, f)
        assert r.pending_transfers <= 4
    assert r.evicted == 6


def test_orphan_chunk_larger_than_pending_limit_rejected():
    r = make(max_pending=2048, max_message=1 << 20)
    s, f = frame_payload(os.urandom(20_000), 4096)[0]
    with pytest.raises(ProtocolError):
        r.feed(TOPIC + s, f)
    assert r.pending_bytes == 0 and r.pending_transfers == 0


def test_orphans_expire():
    clock = FakeClock()
    r = make(timeout=10.0, clock=clock)
    frames = frame_payload(os.urandom(3000), 1024)
    for s, f in frames[:2]:
        r.feed(TOPIC + s, f)
    assert r.pending_transfers == 1 and r.pending_bytes == 2048
    clock.t += 5
    assert r.expire() == []
    clock.t += 6
    reasons = r.expire()
    assert len(reasons) == 1 and "orphan" in reasons[0]
    assert r.pending_transfers == 0 and r.pending_bytes == 0 and r.expired == 1


def test_incomplete_transfer_expires_inside_feed():
    clock = FakeClock()
    r = make(timeout=10.0, clock=clock)
    frames = frame_payload(os.urandom(3000), 1024)
    r.feed(TOPIC, frames[-1][1])
    r.feed(TOPIC + frames[0][0], frames[0][1])
    clock.t += 11
    assert r.feed("other", frame_payload(b"x", 10)[0][1]) == ("other", b"x")
    assert r.expired == 1 and r.pending_transfers == 0
    # The rest of the old transfer now arrives as orphans and never completes.
    assert feed_all(r, frames[1:-1]) == []


def test_progress_keeps_a_transfer_alive():
    clock = FakeClock()
    payload = os.urandom(6000)
    frames = frame_payload(payload, 1024)
    r = make(timeout=10.0, clock=clock)
    outs = []
    for s, f in [frames[-1], *frames[:-1]]:
        clock.t += 8
        outs += [o for o in [r.feed(TOPIC + s, f)] if o]
    assert outs == [(TOPIC, payload)]


def test_empty_payload_is_not_framed():
    with pytest.raises(ValueError, match="empty payload"):
        frame_payload(b"", 1024)


def test_empty_payload_ignored():
    r = make()
    assert r.feed(TOPIC, b"") is None
    assert r.feed(TOPIC + "/c/3", b"") is None
    assert r.rejected == 0


def test_newer_manifest_supersedes_incomplete_older_transfer():
    r = make()
    old, new = os.urandom(5000), os.urandom(4000)
    old_frames, new_frames = frame_payload(old, 1024), frame_payload(new, 1024)
    r.feed(TOPIC, old_frames[-1][1])
    r.feed(TOPIC + old_frames[0][0], old_frames[0][1])
    assert r.pending_transfers == 1
    outs = feed_all(r, [new_frames[-1], *new_frames[:-1]])
    assert outs == [(TOPIC, new)]
    assert r.pending_transfers == 0 and r.pending_bytes == 0
    # Late chunks of the superseded transfer only make orphans, which never complete.
    assert feed_all(r, old_frames[1:-1]) == []


def test_completed_transfer_ignored_for_a_while_but_lru_bounded():
    r = make(completed_memory=2)
    p = os.urandom(3000)
    frames = frame_payload(p, 1024)
    assert feed_all(r, frames) == [(TOPIC, p)]
    assert feed_all(r, frames) == []
    assert r.duplicates == len(frames)
    for i in range(3):
        feed_all(r, frame_payload(os.urandom(3000), 1024), topic=f"x/{i}")
    # Forgotten after the LRU rolled over: a full replay completes again.
    assert feed_all(r, frames) == [(TOPIC, p)]


def test_chunk_length_checked_against_manifest():
    payload = os.urandom(3000)
    frames = frame_payload(payload, 1024)
    s, f = frames[0]
    chunk = msgpack.unpackb(f, raw=False)
    tid, data = chunk["transfer"], chunk["data"]
    r = make()
    r.feed(TOPIC, frames[-1][1])
    with pytest.raises(ProtocolError, match="bytes, manifest says"):
        r.feed(TOPIC + s, pack_chunk(tid, 0, data[:-10]))
    with pytest.raises(ProtocolError, match="beyond the manifest's chunks"):
        r.feed(TOPIC + "/c/9", pack_chunk(tid, 9, data))
