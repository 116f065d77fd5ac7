"""Serial framing (protocol/framing.py) on CPython and on the real MicroPython.

Wire format: 0x00, COBS(payload || CRC32-LE(payload)), 0x00.

protocol/vectors/framing.json is made by this file (`python tests/test_framing.py`
writes it, `--check` compares) from a reference written here from the
definitions: COBS as Cheshire & Baker define it, binascii.crc32, and a
declarative model of the reader (split the stream at the zeros, judge each
piece on its own). None of it imports framing.py, so the vectors do not just
echo the code under test; the tests then hold framing.py, on both
interpreters, to the vectors byte for byte.
"""

from __future__ import annotations

import json
import random
import sys
from binascii import crc32
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from voltgate import tree, wire

VECTOR_FILE = tree.vectors_dir() / "framing.json"
MAX_FRAME = wire.MAX_FRAME
COUNTERS = ("frames", "bad_crc", "bad_cobs", "overflows")


# --- reference -------------------------------------------------------------


def ref_cobs(data: bytes) -> bytes:
    """COBS by its definition: add a phantom zero to the end, cut the data
    after every zero; each piece of k non-zero bytes and its zero becomes the
    byte k+1 and the k bytes, except that 254 non-zero bytes with no zero after
    them become 0xFF and the 254 bytes. The phantom zero's piece ends the output
    (so data ending in a full 254-byte block ends ...0xFF <254 bytes> 0x01, as
    in the paper's StuffData)."""
    out = bytearray()
    for piece in (data + b"\0").split(b"\0")[:-1]:
        while len(piece) >= 254:
            out += b"\xff" + piece[:254]
            piece = piece[254:]
        out += bytes([len(piece) + 1]) + piece
    return bytes(out)


def ref_uncobs(body: bytes) -> bytes | None:
    """Inverse of ref_cobs, or None if body is not a COBS encoding."""
    out = bytearray()
    i = 0
    while i < len(body):
        code = body[i]
        if code == 0 or i + code > len(body):
            return None
        out += body[i + 1 : i + code]
        i += code
        if code != 0xFF and i < len(body):
            out.append(0)
    return bytes(out)


def ref_crc(payload: bytes) -> bytes:
    return (crc32(payload) & 0xFFFFFFFF).to_bytes(4, "little")


def ref_frame(payload: bytes) -> bytes:
    return b"\0" + ref_cobs(payload + ref_crc(payload)) + b"\0"


def ref_cap(max_payload: int) -> int:
    """The reader's buffer: the longest body a max_payload-byte payload can
    have on the wire (all bytes non-zero gives the most 0xFF blocks)."""
    return len(ref_cobs(b"\x01" * (max_payload + 4)))


def ref_judge(body: bytes, max_payload: int) -> tuple[str, bytes | None]:
    """What the reader makes of one non-empty piece between two zeros."""
    if len(body) > ref_cap(max_payload):
        return "overflows", None
    dec = ref_uncobs(body)
    if dec is None or len(dec) < 4:
        return "bad_cobs", None
    payload, crc = dec[:-4], dec[-4:]
    if ref_crc(payload) != crc:
        return "bad_crc", None
    if len(payload) > max_payload:
        return "overflows", None
    return "frames", payload


def ref_deframe(stream: bytes, max_payload: int) -> dict:
    """The reader as a declarative model: every piece between two zeros is
    judged on its own; empty pieces (back-to-back zeros) are nothing; the piece
    after the last zero is not finished yet, but already an overflow if it is
    longer than the buffer."""
    counters = dict.fromkeys(COUNTERS, 0)
    payloads = []
    *pieces, pending = stream.split(b"\0")
    for body in pieces:
        if body:
            verdict, payload = ref_judge(body, max_payload)
            counters[verdict] += 1
            if payload is not None:
                payloads.append(payload.hex())
    if len(pending) > ref_cap(max_payload):
        counters["overflows"] += 1  # counted as soon as the buffer overflows
    return {"payloads": payloads, "counters": counters}


# --- vectors ---------------------------------------------------------------


def _run(n: int, start: int = 0) -> bytes:
    """n non-zero bytes."""
    return bytes((start + i) % 255 + 1 for i in range(n))


def _run_with_nonzero_crc(n: int) -> bytes:
    """n non-zero bytes whose CRC has no zero byte either, so the whole body is
    one run of n + 4 non-zero bytes."""
    start = 0
    while 0 in ref_crc(_run(n, start)):
        start += 1
    return _run(n, start)


def _crc_with_zero(pred) -> bytes:
    i = 0
    while not pred(ref_crc(b"crc %d" % i)):
        i += 1
    return b"crc %d" % i


def _frame_vectors() -> list[dict]:
    rng = random.Random(20240521)
    cases = [
        ("empty payload (its CRC is 00000000)", b""),
        ("one byte 0x00", b"\0"),
        ("one byte 0x01", b"\x01"),
        ("one byte 0xff", b"\xff"),
        ("16 zero bytes", b"\0" * 16),
        ("text", b"voltgate"),
        ("zeros at both ends and in the middle", b"\0ab\0\0cd\0"),
        ("CRC low byte zero (zero right after the payload)", _crc_with_zero(lambda c: c[0] == 0)),
        ("CRC high byte zero (the body ends in 0x00)", _crc_with_zero(lambda c: c[3] == 0)),
        ("CRC with two zero bytes", _crc_with_zero(lambda c: c.count(0) >= 2)),
        ("body of 253 non-zero bytes (one block, code 0xfe)", _run_with_nonzero_crc(249)),
        ("body of 254 non-zero bytes (a full 0xff block, then 0x01)", _run_with_nonzero_crc(250)),
        ("body of 255 non-zero bytes (0xff block, then one byte)", _run_with_nonzero_crc(251)),
        ("253 non-zero bytes", _run(253)),
        ("254 non-zero bytes", _run(254)),
        ("255 non-zero bytes", _run(255)),
        ("254 non-zero bytes then a zero (0xff block before a zero)", _run(254) + b"\0"),
        ("body of 508 non-zero bytes (two full blocks, then 0x01)", _run_with_nonzero_crc(504)),
        ("508 non-zero bytes", _run(508)),
        ("600 bytes, a zero every 100", b"".join(_run(99, i) + b"\0" for i in range(6))),
        ("MAX_FRAME random bytes", bytes(rng.getrandbits(8) for _ in range(MAX_FRAME))),
        ("MAX_FRAME non-zero bytes", _run(MAX_FRAME)),
    ]
    return [{"name": name, "payload": p.hex(), "frame": ref_frame(p).hex()} for name, p in cases]


def _stream(name, chunks, max_payload, payloads, **counters) -> dict:
    c = dict.fromkeys(COUNTERS, 0)
    c["frames"] = len(payloads)
    c.update(counters)
    return {
        "name": name,
        "chunks": [b.hex() for b in chunks],
        "max_payload": max_payload,
        "payloads": [p.hex() for p in payloads],
        "counters": c,
    }


def _stream_vectors() -> list[dict]:
    F = ref_frame
    a, b = b"first", b"second\0frame"
    c = bytes(range(40))
    d = b"hello, board"  # no zero in it or its CRC: every body byte after the first is data
    assert 0 not in d + ref_crc(d)
    corrupt = bytearray(F(d))
    corrupt[5] ^= 0x01  # a data byte, still non-zero: COBS fine, CRC wrong
    bad_code = bytearray(F(d))
    bad_code[1] += 1  # the code byte now reaches past the body: bad COBS
    blocky = b"abc\0defgh\0ijkl"  # body 04 abc 06 defgh 05 ijkl ...
    long301 = b"".join(_run(99, i) + b"\0" for i in range(3)) + b"\x01\x02\x03\x04"  # 301 bytes, runs < 254
    garbage = b"AT+RST\r\n"  # 'A' = 65 as a code byte reaches past the piece: bad COBS
    empty_crc_bad = b"\x05abcd"  # COBS decodes to 'abcd': empty payload, CRC wrong
    between = b"\x13\x37garbage"
    fc = F(c)
    return [
        _stream("garbage before a frame", [garbage + b"\0" + empty_crc_bad + F(a)], 64, [a], bad_cobs=1, bad_crc=1),
        _stream("garbage between frames, split across chunks",
                [F(a) + between[:3], between[3:] + F(b)[:5], F(b)[5:]], 64, [a, b], bad_cobs=1),
        _stream("a frame split byte by byte", [fc[i : i + 1] for i in range(len(fc))], 64, [c]),
        _stream("two frames in one chunk", [F(a) + F(b)], 64, [a, b]),
        _stream("corrupted data byte (bad CRC), then a good frame", [bytes(corrupt) + F(b)], 64, [b], bad_crc=1),
        _stream("corrupted code byte (bad COBS), then a good frame", [bytes(bad_code), F(b)], 64, [b], bad_cobs=1),
        _stream("over-long frame, then a good frame", [F(_run(32)), F(a)], 16, [a], overflows=1),
        _stream("long garbage overflows the buffer once, then a good frame", [b"\x55" * 100, F(a)], 16, [a], overflows=1),
        _stream("payload at max_payload accepted; one byte over dropped, in the buffer or after decoding",
                [F(_run(300)), F(_run(301)), F(long301), F(a)], 300, [_run(300), a], overflows=2),
        _stream("back-to-back delimiters", [b"\0\0\0" + F(a) + b"\0\0", b"\0", F(b) + b"\0\0\0"], 64, [a, b]),
        _stream("truncated frame (bad COBS), then a good frame", [F(d)[:8] + F(b)], 64, [b], bad_cobs=1),
        _stream("truncated at a block boundary (bad CRC), then a good frame", [F(blocky)[:11], F(b)], 64, [b], bad_crc=1),
        _stream("unfinished frame at the end yields nothing yet", [F(a) + F(b)[:-1]], 64, [a]),
        _stream("only delimiters and empty chunks", [b"", b"\0", b"", b"\0\0\0\0"], 64, []),
        _stream("MAX_FRAME payload in three chunks, default max_payload",
                [F(_run(MAX_FRAME))[:700], F(_run(MAX_FRAME))[700:1400], F(_run(MAX_FRAME))[1400:]], MAX_FRAME, [_run(MAX_FRAME)]),
    ]


def build_vectors() -> dict:
    return {
        "about": "Serial framing: 0x00, COBS(payload || CRC32-LE(payload)), 0x00. Made by tests/test_framing.py "
        "from its reference COBS; firmware and host check every vector byte for byte.",
        "frames": _frame_vectors(),
        "streams": _stream_vectors(),
    }


def vectors_text() -> str:
    return json.dumps(build_vectors(), indent=1) + "\n"


VEC = json.loads(VECTOR_FILE.read_text()) if VECTOR_FILE.exists() else {"frames": [], "streams": []}


# --- the vectors and the reference ------------------------------------------


def test_vector_file_is_what_the_generator_makes():
    assert VECTOR_FILE.read_text() == vectors_text(), "run: .venv/bin/python tests/test_framing.py"


def test_vectors_cover_the_required_cases():
    frames = {bytes.fromhex(v["payload"]) for v in VEC["frames"]}
    assert {b"", b"\0", b"\0" * 16, _run(253), _run(254), _run(255)} <= frames
    assert any(len(p) >= 508 for p in frames)
    assert any(0 in ref_crc(p) for p in frames)
    bodies = [ref_cobs(p + ref_crc(p)) for p in frames]
    # the 0xff block boundary is hit exactly at the end of a body, and mid-body
    assert any(b.endswith(b"\x01") and b[-256] == 0xFF for b in bodies if len(b) > 256)
    assert sum(s["counters"]["overflows"] > 0 for s in VEC["streams"]) >= 2
    assert all(any(s["counters"][k] for s in VEC["streams"]) for k in COUNTERS)


@pytest.mark.parametrize("v", VEC["streams"], ids=lambda v: v["name"])
def test_stream_expectations_agree_with_the_reference_model(v):
    stream = b"".join(bytes.fromhex(c) for c in v["chunks"])
    assert ref_deframe(stream, v["max_payload"]) == {"payloads": v["payloads"], "counters": v["counters"]}


def test_reference_cobs_known_answers():
    # Wikipedia's COBS examples (they end a trailing full block without the
    # 0x01 the paper's encoder, and ours, emits; both decode the same).
    assert ref_cobs(b"") == b"\x01"
    assert ref_cobs(b"\0") == b"\x01\x01"
    assert ref_cobs(b"\0\0") == b"\x01\x01\x01"
    assert ref_cobs(b"\x11\x22\0\x33") == b"\x03\x11\x22\x02\x33"
    assert ref_cobs(b"\x11\x00\x00\x00") == b"\x02\x11\x01\x01\x01"
    seq = bytes(range(1, 255))
    assert ref_cobs(seq) == b"\xff" + seq + b"\x01"
    assert ref_uncobs(b"\xff" + seq) == seq
    assert ref_cobs(bytes(range(0, 255))) == b"\x01\xff" + seq + b"\x01"
    assert ref_cobs(bytes(range(1, 256))) == b"\xff" + seq + b"\x02\xff"
    assert ref_crc(b"123456789") == (0xCBF43926).to_bytes(4, "little")  # the CRC-32 check value


# --- framing.py on both interpreters ---------------------------------------


def test_every_vector_byte_for_byte(interp):
    got = interp.call("framing_checks", "run_vectors", str(VECTOR_FILE))
    assert [g["name"] for g in got["frames"]] == [v["name"] for v in VEC["frames"]]
    for v, g in zip(VEC["frames"], got["frames"]):
        assert g["frame"] == v["frame"], v["name"]
        one = dict.fromkeys(COUNTERS, 0)
        one["frames"] = 1
        assert g["deframed"] == {"payloads": [v["payload"]], "counters": one}, v["name"]
    assert [g["name"] for g in got["streams"]] == [v["name"] for v in VEC["streams"]]
    for v, g in zip(VEC["streams"], got["streams"]):
        assert g["payloads"] == v["payloads"], v["name"]
        assert g["counters"] == v["counters"], v["name"]


def test_max_encoded_is_the_worst_case_exactly(interp):
    ns = list(range(0, 1100)) + [MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]
    got = interp.call("framing_checks", "max_encoded_many", ns)
    assert got == [2 + ref_cap(n) for n in ns]


def test_feed_returns_nothing_until_a_frame_completes(interp):
    f = ref_frame(b"abc")
    assert interp.call("framing_checks", "deframe", [f[:-1].hex()], 64) == {"payloads": [], "counters": dict.fromkeys(COUNTERS, 0)}


# --- properties --------------------------------------------------------------

PROPS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _payload(rng_seed: int, size: int, zero_rate: float) -> bytes:
    rng = random.Random(rng_seed)
    return bytes(0 if rng.random() < zero_rate else rng.randrange(1, 256) for _ in range(size))


def payloads(max_size: int):
    """Small ones Hypothesis can shrink; big ones (up to max_size) from a seed,
    with no zeros (long runs, 0xff blocks), few, many, or only zeros."""
    return st.one_of(
        st.binary(max_size=min(max_size, 64)),
        st.builds(_payload, st.integers(0, 2**32), st.integers(0, max_size), st.sampled_from([0.0, 1 / 256, 0.1, 0.5, 1.0])),
    )


chunk_sizes = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 3000)), min_size=1, max_size=6)


@PROPS
@given(cases=st.lists(st.tuples(st.lists(payloads(MAX_FRAME), min_size=1, max_size=4), chunk_sizes), min_size=1, max_size=8))
def test_round_trip_in_random_chunks(interp, cases):
    got = interp.call("framing_checks", "roundtrip_many", [[[p.hex() for p in ps], sizes, MAX_FRAME] for ps, sizes in cases])
    for (ps, _), g in zip(cases, got, strict=True):
        for p, f in zip(ps, g["frames"], strict=True):
            frame = bytes.fromhex(f)
            assert frame == ref_frame(p)
            # 0x00 only as the first and last byte
            assert frame[0] == 0 and frame[-1] == 0 and 0 not in frame[1:-1]
            assert len(frame) <= 2 + ref_cap(len(p))
        assert g["payloads"] == [p.hex() for p in ps]
        assert g["counters"] == {"frames": len(ps), "bad_crc": 0, "bad_cobs": 0, "overflows": 0}


def _truncated(p: bytes, cut: int) -> bytes:
    f = ref_frame(p)
    return f[: cut % (len(f) - 2)]  # never the whole body: that would be a frame


garbage_piece = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0xFE, 0xFF]), max_size=64).map(bytes),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 400), st.integers(1, 255)),
    st.builds(_truncated, st.binary(max_size=40), st.integers(0, 10**6)),
)
garbage = st.lists(garbage_piece, max_size=3).map(b"".join)


@st.composite
def noisy_streams(draw):
    max_payload = draw(st.sampled_from([8, 64, 300, MAX_FRAME]))
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        parts.append(("g", draw(garbage)))
        parts.append(("p", draw(payloads(max_payload))))
    parts.append(("g", draw(garbage)))
    return parts, draw(chunk_sizes), max_payload


@PROPS
@given(cases=st.lists(noisy_streams(), min_size=1, max_size=12))
def test_garbage_never_loses_a_frame_nor_makes_one_up(interp, cases):
    for parts, _, max_payload in cases:
        # Garbage that happens to be a whole valid frame between two zeros
        # (five 0x01 bytes are the empty payload's) is a frame; leave it out.
        for kind, g in parts:
            if kind == "g":
                assume(all(ref_judge(piece, max_payload)[0] != "frames" for piece in g.split(b"\0") if piece))
    got = interp.call("framing_checks", "with_garbage_many", [[[[k, b.hex()] for k, b in parts], sizes, mp] for parts, sizes, mp in cases])
    for (parts, _, max_payload), g in zip(cases, got, strict=True):
        sent = [b.hex() for k, b in parts if k == "p"]
        assert g["payloads"] == sent
        stream = b"".join(ref_frame(b) if k == "p" else b for k, b in parts)
        assert g["counters"] == ref_deframe(stream, max_payload)["counters"]


# --- on the board's heap -------------------------------------------------------

HEAP_SCRIPT = r"""
import gc
import micropython
import framing
from vgemit import emit


def main(n_frames):
    payloads = []
    for n in (0, 1, 37, 120, 250, 300):
        payloads.append(bytes((i * 7 + n) % 256 for i in range(n)))  # zeros in most
    frames = [framing.encode(p) for p in payloads]
    d = framing.Deframer()
    one = bytearray(1)
    good = 0
    wrong = 0
    payload_bytes = 0
    idle = 0  # allocation by feed() of the bytes between the delimiters
    gc.collect()
    start = micropython.mem_total()
    for i in range(n_frames):
        k = i % 6
        for b in frames[k]:
            one[0] = b
            t = micropython.mem_total()
            got = d.feed(one)
            if b:
                idle += micropython.mem_total() - t
            for p in got:
                if p == payloads[k]:
                    good += 1
                else:
                    wrong += 1
        payload_bytes += len(payloads[k])
    total = micropython.mem_total() - start
    emit({"good": good, "wrong": wrong, "total": total, "idle": idle, "payload_bytes": payload_bytes,
          "counters": [d.frames, d.bad_crc, d.bad_cobs, d.overflows]})


main(200)
"""

# Allocation per completed frame, beyond the payload bytes themselves, as the
# unix port counts it (micropython.mem_total: every byte ever allocated, also
# what is freed at once). Measured 481 B on MicroPython 1.29 (64-bit):
#     33  the payload copy's bytes object (+ m data bytes, counted separately)
#     64  the result list [payload]
#     96  a memoryview of the buffer and two slices of it (CRC and copy)
#    288  Deframer._end's call state, 144 B at each of the frame's two
#         delimiters: _end needs more than 11 slots of locals and stack, so
#         the VM puts its state on the heap and frees it on return
# The bound leaves ~60% for other interpreter versions. What it exists to
# catch costs far more: any allocation per byte fed (frames here average 125
# bytes, so even one 16-byte block per byte is +2000 B; the old feed(), with a
# new list and a heap call state per call, cost 216 B per byte: ~27 KB per
# frame here) or a copy of the 2061-byte receive buffer.
FRAME_OVERHEAD_BOUND = 768


def test_deframer_byte_by_byte_in_a_32k_heap(mp):
    res = mp.run(code=HEAP_SCRIPT, heapsize=32 * 1024, compiled=True)
    r = res.record
    assert (r["good"], r["wrong"]) == (200, 0)
    assert r["counters"] == [200, 0, 0, 0]
    # a byte inside a frame (not a delimiter) costs no heap at all
    assert r["idle"] == 0
    per_frame = r["total"] / 200
    assert per_frame < r["payload_bytes"] / 200 + FRAME_OVERHEAD_BOUND, r


if __name__ == "__main__":
    text = vectors_text()
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if Path(VECTOR_FILE).read_text() == text else 1)
    VECTOR_FILE.write_text(text)
    print(f"wrote {VECTOR_FILE}")
