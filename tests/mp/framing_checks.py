# Runs on MicroPython and CPython: the serial framing checks that
# tests/test_framing.py calls through the `interp` fixture. Bytes cross the
# interpreter boundary as hex; results are plain JSON values.
import json
from binascii import hexlify, unhexlify

import framing
import wire


def _hex(b):
    return hexlify(b).decode()


def _counters(d):
    return {"frames": d.frames, "bad_crc": d.bad_crc, "bad_cobs": d.bad_cobs, "overflows": d.overflows}


def encode(payload_hex):
    return _hex(framing.encode(unhexlify(payload_hex)))


def max_encoded_many(ns):
    return [framing.max_encoded(n) for n in ns]


def deframe(chunks_hex, max_payload):
    """Feed the chunks, in order, to one Deframer(max_payload).

    {"payloads": [hex, ...], "counters": {"frames", "bad_crc", "bad_cobs", "overflows"}}"""
    d = framing.Deframer(max_payload)
    got = []
    for c in chunks_hex:
        for p in d.feed(unhexlify(c)):
            got.append(_hex(p))
    return {"payloads": got, "counters": _counters(d)}


def _feed_chunked(stream, sizes, max_payload):
    # Chunk sizes cycle through `sizes`; the chunk type cycles through bytes,
    # bytearray and memoryview (what uart.read, readinto and slicing give).
    d = framing.Deframer(max_payload)
    mv = memoryview(stream)
    got = []
    i = 0
    k = 0
    while i < len(stream):
        j = min(len(stream), i + sizes[k % len(sizes)])
        kind = k % 3
        if kind == 0:
            chunk = bytes(mv[i:j])
        elif kind == 1:
            chunk = bytearray(mv[i:j])
        else:
            chunk = mv[i:j]
        for p in d.feed(chunk):
            got.append(_hex(p))
        i = j
        k += 1
    return {"payloads": got, "counters": _counters(d)}


def roundtrip(payloads_hex, sizes, max_payload):
    """Encode each payload, then feed all the frames back to back to one
    Deframer in chunks of the given sizes.

    {"frames": [hex of each encoded frame], "payloads": [...], "counters": {...}}"""
    frames = [framing.encode(unhexlify(p)) for p in payloads_hex]
    res = _feed_chunked(b"".join(frames), sizes, max_payload)
    res["frames"] = [_hex(f) for f in frames]
    return res


def roundtrip_many(cases):
    """cases: [[payloads_hex, sizes, max_payload], ...]; one roundtrip() result each."""
    return [roundtrip(c[0], c[1], c[2]) for c in cases]


def with_garbage(parts, sizes, max_payload):
    """parts: [["g", hex] or ["p", hex], ...]: "g" bytes go on the wire as they
    are, "p" payloads are encoded first. Fed in chunks of the given sizes."""
    out = []
    for kind, h in parts:
        b = unhexlify(h)
        out.append(framing.encode(b) if kind == "p" else b)
    return _feed_chunked(b"".join(out), sizes, max_payload)


def with_garbage_many(cases):
    """cases: [[parts, sizes, max_payload], ...]; one with_garbage() result each."""
    return [with_garbage(c[0], c[1], c[2]) for c in cases]


def run_vectors(path):
    """Check every vector of protocol/vectors/framing.json on this interpreter.

    frames:  {"name", "frame": hex of encode(payload),
              "deframed": deframe([frame], wire.MAX_FRAME) of the vector's frame}
    streams: {"name", "payloads", "counters"} from deframe(chunks, max_payload)"""
    with open(path) as f:
        vec = json.load(f)
    frames = []
    for t in vec["frames"]:
        frames.append({"name": t["name"], "frame": encode(t["payload"]), "deframed": deframe([t["frame"]], wire.MAX_FRAME)})
    streams = []
    for t in vec["streams"]:
        r = deframe(t["chunks"], t["max_payload"])
        r["name"] = t["name"]
        streams.append(r)
    return {"frames": frames, "streams": streams}
