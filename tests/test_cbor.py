"""The CBOR codec (protocol/cbor.py) on CPython and on MicroPython.

- protocol/vectors/cbor.json: RFC 8949 Appendix A examples and hand-written
  malformed inputs. The host checks the vectors themselves against cbor2;
  both interpreters must decode the valid ones to the expected value (and
  re-encode the deterministic ones byte for byte) and reject the malformed
  ones with a CBORError that says what is wrong.
- hypothesis properties against cbor2, batched so that each MicroPython round
  trip checks many values: cbor2 encodes and we decode, we encode and cbor2
  decodes, and our map encoding equals cbor2's when cbor2 is given the keys in
  RFC 8949 section 4.2.1 order (bytewise order of the encoded keys).
"""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timezone

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voltgate import tree

VECTORS_FILE = tree.vectors_dir() / "cbor.json"
VECTORS = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
VALID = {v["name"]: v for v in VECTORS["valid"]}
MALFORMED = {v["name"]: v for v in VECTORS["malformed"]}
MAX_DEPTH = 16  # cbor.MAX_DEPTH; a test below checks the two agree

# Malformed vectors that cbor2 5.x decodes without complaint; for every other
# malformed vector the host test asserts cbor2 raises too.
CBOR2_ACCEPTS = {
    # indefinite lengths (cbor2 supports them; we refuse them) and breaks (cbor2
    # returns its break_marker object instead of failing)
    "indefinite bytes",
    "indefinite text",
    "indefinite array",
    "indefinite empty array",
    "indefinite map",
    "lone break",
    "break inside definite array",
    # cbor2's depth limit is far above ours
    "17 nested arrays (limit 16)",
    "100 nested arrays",
    "100 nested maps",
    "100 nested tags",
    # cbor2 does not check that a two-byte simple value is >= 32
    "two-byte simple value 16",
    "two-byte simple value 0",
    "two-byte simple value 31",
    # cbor2 keeps the last of duplicate keys
    "duplicate int map key",
    "duplicate text map key",
    "duplicate map key after others",
    "duplicate bytes map key",
    # cbor2 turns array / map keys into tuples / FrozenDicts
    "array as map key",
    "empty array as map key",
    "map as map key",
    "array as second map key",
    # cbor2.loads ignores bytes after the first item
    "trailing byte after int",
    "trailing bytes after array",
    "trailing break",
}

# Tags whose content cbor2 decodes into Python objects (cbor2._decoder.semantic_decoders).
CBOR2_SEMANTIC_TAGS = {0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 43000, 55799}

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    # `interp` is function-scoped but stateless (the MicroPython workers are per session)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- typed JSON <-> cbor2 values


def to_cbor2(j):
    """A typed JSON value (tests/mp/jv.py) as the object cbor2 decodes it to."""
    if not isinstance(j, list):
        return j
    kind = j[0]
    if kind == "b":
        return bytes.fromhex(j[1])
    if kind == "f":
        return struct.unpack(">d", bytes.fromhex(j[1]))[0]
    if kind == "a":
        return [to_cbor2(x) for x in j[1]]
    if kind == "m":
        d = {}
        for k, v in j[1]:
            k = to_cbor2(k)
            assert k not in d, f"duplicate key {k!r} in typed JSON map"
            d[k] = to_cbor2(v)
        return d
    if kind == "t":
        return cbor2.CBORTag(j[1], to_cbor2(j[2]))
    if kind == "s":
        return cbor2.undefined if j[1] == 23 else cbor2.CBORSimpleValue(j[1])
    raise ValueError(f"unknown typed JSON kind {kind!r}")


def from_cbor2(v):
    """A cbor2-domain value as typed JSON (maps keep their insertion order)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, bytes):
        return ["b", v.hex()]
    if isinstance(v, float):
        return ["f", struct.pack(">d", v).hex()]
    if isinstance(v, list):
        return ["a", [from_cbor2(x) for x in v]]
    if isinstance(v, dict):
        return ["m", [[from_cbor2(k), from_cbor2(x)] for k, x in v.items()]]
    if isinstance(v, cbor2.CBORTag):
        return ["t", v.tag, from_cbor2(v.value)]
    if v is cbor2.undefined:
        return ["s", 23]
    if isinstance(v, cbor2.CBORSimpleValue):
        return ["s", v.value]
    raise TypeError(f"no typed JSON form for {v!r}")


def cbor2_view(j):
    """What cbor2.loads returns for the item a typed JSON value stands for,
    including the tags cbor2 interprets that the vectors use."""
    if isinstance(j, list) and j[0] == "t" and j[1] in CBOR2_SEMANTIC_TAGS:
        n, content = j[1], to_cbor2(j[2])
        if n == 0:
            return datetime.fromisoformat(content)
        if n == 1:
            return datetime.fromtimestamp(content, timezone.utc)
        if n in (2, 3):
            big = int.from_bytes(content, "big")
            return big if n == 2 else -1 - big
        raise AssertionError(f"no cbor2 view of tag {n}: add one or use another tag")
    if isinstance(j, list) and j[0] == "a":
        return [cbor2_view(x) for x in j[1]]
    if isinstance(j, list) and j[0] == "m":
        return {to_cbor2(k): cbor2_view(v) for k, v in j[1]}
    if isinstance(j, list) and j[0] == "t":
        return cbor2.CBORTag(j[1], cbor2_view(j[2]))
    return to_cbor2(j)


def same(a, b) -> bool:
    """Equality of cbor2-domain values that tells 1 from True and 0.0 from -0.0
    and takes any NaN to equal any NaN (payloads may differ, RFC 8949 4.2.2)."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        # pair the entries up by same(), not by lookup: NaN keys never look up
        rest = list(b.items())
        for k, x in a.items():
            i = next((i for i, (k2, y) in enumerate(rest) if same(k, k2) and same(x, y)), None)
            if i is None:
                return False
            del rest[i]
        return not rest
    if isinstance(a, cbor2.CBORTag):
        return a.tag == b.tag and same(a.value, b.value)
    return a == b


def pack(values) -> str:
    """Typed JSON values for cbor_checks.encode_many (see its docstring)."""
    return json.dumps(values, ensure_ascii=False).encode().hex()


# ---------------------------------------------------------------- the vectors themselves (host, cbor2)


def test_vector_file_is_well_formed():
    assert len(VALID) == len(VECTORS["valid"]) and len(MALFORMED) == len(VECTORS["malformed"]), "vector names must be unique"
    assert len(VALID) >= 60 and len(MALFORMED) >= 60
    for v in [*VALID.values(), *MALFORMED.values()]:
        bytes.fromhex(v["hex"])
    for v in VALID.values():
        assert set(v) == {"name", "hex", "value", "deterministic"}, v["name"]
    for v in MALFORMED.values():
        assert set(v) == {"name", "hex", "error"} and v["error"], v["name"]
    assert not CBOR2_ACCEPTS - set(MALFORMED), f"stale names: {CBOR2_ACCEPTS - set(MALFORMED)}"
    hexes = [v["hex"] for v in VECTORS["valid"]]
    assert not set(hexes) & {v["hex"] for v in MALFORMED.values()}


@pytest.mark.parametrize("name", VALID)
def test_valid_vector_agrees_with_cbor2(name):
    v = VALID[name]
    got = cbor2.loads(bytes.fromhex(v["hex"]))
    assert same(got, cbor2_view(v["value"])), f"cbor2 decodes {v['hex']} to {got!r}"
    # "deterministic" means: our encoder (shortest heads, float64, keys in bytewise
    # order) gives these bytes. cbor2 encodes the same way given the keys in that
    # order, except that it writes infinities and NaN as half floats.
    if not any(isinstance(x, float) and not math.isfinite(x) for x in _walk(to_cbor2(v["value"]))):
        enc = cbor2.dumps(ordered(to_cbor2(v["value"]))).hex()
        assert (enc == v["hex"]) == v["deterministic"], f"cbor2 with ordered keys gives {enc}"


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_vector_is_rejected_by_cbor2_where_it_is_strict(name):
    v = MALFORMED[name]
    data = bytes.fromhex(v["hex"])
    if name in CBOR2_ACCEPTS:
        cbor2.loads(data)  # keeps the list above honest: it must really accept it
    else:
        with pytest.raises(cbor2.CBORDecodeError):
            cbor2.loads(data)


def _walk(v):
    """v and everything inside it (cbor2-domain values)."""
    yield v
    if isinstance(v, list):
        for x in v:
            yield from _walk(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _walk(k)
            yield from _walk(x)
    elif isinstance(v, cbor2.CBORTag):
        yield from _walk(v.value)


# ---------------------------------------------------------------- the vectors on both interpreters

_vector_runs: dict = {}


def vector_run(interp):
    """cbor_checks.run_vectors on this interpreter, once per session."""
    if interp.name not in _vector_runs:
        res = interp.call("cbor_checks", "run_vectors", str(VECTORS_FILE))
        _vector_runs[interp.name] = (
            {r["name"]: r for r in res["valid"]},
            {r["name"]: r for r in res["malformed"]},
        )
    return _vector_runs[interp.name]


def _crash_text(r):
    return f"{r['crash']}: {r['msg']}\n{r['tb']}"


@pytest.mark.parametrize("name", VALID)
def test_valid_vector_decodes(interp, name):
    v = VALID[name]
    r = vector_run(interp)[0][name]
    assert "crash" not in r, _crash_text(r)
    assert "v" in r["got"], f"{v['hex']} rejected: {r['got']}"
    assert same(to_cbor2(r["got"]["v"]), to_cbor2(v["value"])), f"{v['hex']} decoded to {r['got']['v']}"
    # the value's re-encoding is the same value again, and byte-identical for deterministic vectors
    assert same(cbor2.loads(bytes.fromhex(r["enc"])), cbor2_view(v["value"]))
    if v["deterministic"]:
        assert r["enc"] == v["hex"]
    else:
        assert r["enc"] != v["hex"], "marked non-deterministic but re-encodes identically"


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_vector_is_rejected(interp, name):
    v = MALFORMED[name]
    r = vector_run(interp)[1][name]
    assert "crash" not in r, f"{v['hex']}: " + _crash_text(r)
    assert "err" in r["got"], f"{v['hex']} accepted as {r['got']}"
    assert v["error"] in r["got"]["err"], f"{v['hex']}: {r['got']['err']!r} does not say {v['error']!r}"


def test_rejection_names_the_offset(interp):
    def err(h):
        return interp.call("cbor_checks", "decode", h)["err"]

    # the byte string's 4 bytes would start at offset 3, where 2 are left
    assert err("8201" + "44aabb") == "truncated: need 4 bytes at offset 3, 2 left"
    # the second key 1 is bytes 3..4
    assert err("a20102" + "0103") == "duplicate map key before offset 4"
    assert err("8201" + "1c") == "reserved additional information 28 at offset 2"
    assert err("830102") == "array of 3 items at offset 1 exceeds the 2 bytes left"
    assert err("0102") == "1 trailing bytes at offset 1"


def test_depth_limit_constant():
    import cbor

    assert cbor.MAX_DEPTH == MAX_DEPTH


@pytest.mark.parametrize("max_depth", [1, 2, 3, 7])
def test_loads_honours_a_smaller_max_depth(interp, max_depth):
    at_limit = "81" * (max_depth - 1) + "00"
    assert interp.call("cbor_checks", "decode", at_limit, max_depth) == {"v": _nest("a" * (max_depth - 1), 0)}
    r = interp.call("cbor_checks", "decode", "81" + at_limit, max_depth)
    assert r.get("err", "").startswith(f"nesting deeper than {max_depth} "), r


# ---------------------------------------------------------------- encoder limits


@pytest.mark.parametrize(
    "value, error",
    [
        (2**64, "64 bits"),
        (-(2**64) - 1, "64 bits"),
        (["t", 2**64, 0], "tag number out of range"),
        (["s", 24], "not encodable"),
        (["s", 31], "not encodable"),
        (["s", 256], "not encodable"),
        (["a", [["a", [1, ["a", [["m", [[1, 2**64]]]]]]]]], "64 bits"),
    ],
)
def test_encoder_refuses_what_cbor_cannot_carry(interp, value, error):
    r = interp.call("cbor_checks", "try_encode", value)
    assert "err" in r and error in r["err"], r


def _nest(wrappers, leaf):
    v = leaf
    for w in wrappers:
        v = ["a", [v]] if w == "a" else ["m", [[0, v]]] if w == "m" else ["t", 17, v]
    return v


@given(wrappers=st.lists(st.sampled_from("amt"), min_size=MAX_DEPTH - 3, max_size=MAX_DEPTH + 3))
@PROPERTY_SETTINGS
def test_depth_limit_is_the_same_for_encoding_and_decoding(interp, wrappers):
    value = _nest(wrappers, 7)
    depth = len(wrappers) + 1
    data = cbor2.dumps(to_cbor2(value)).hex()
    dec = interp.call("cbor_checks", "decode", data)
    enc = interp.call("cbor_checks", "try_encode", value)
    if depth <= MAX_DEPTH:
        assert dec == {"v": value} and enc == {"hex": data}
    else:
        assert "nesting deeper than" in dec.get("err", ""), dec
        assert "nesting deeper than" in enc.get("err", ""), enc


# ---------------------------------------------------------------- properties against cbor2

_other_tags = st.sampled_from([6, 16, 17, 18, 24, 32, 61, 96, 97, 98, 65535]) | st.integers(40000, 2**64 - 1).filter(
    lambda n: n not in CBOR2_SEMANTIC_TAGS
)
_simple = st.integers(0, 19).map(cbor2.CBORSimpleValue) | st.integers(32, 255).map(cbor2.CBORSimpleValue) | st.just(cbor2.undefined)
_edges = [23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -24, -25, -257, -(2**32) - 1, -(2**64)]
_ints = st.integers(-(2**64), 2**64 - 1) | st.sampled_from(_edges)
# Int and text keys only: a MicroPython dict that holds a bytes and a str key of
# the same content (b"" and "") prints "Warning: Comparison between bytes and str"
# to stderr on every lookup, and the harness's worker never reads its stderr, so
# thousands of them fill the pipe and hang the worker. Mixed bytes/text keys are
# covered by the vectors.
_keys = st.integers(-(2**64), 2**64 - 1) | st.text(max_size=8)


def _leaves(floats):
    return _ints | st.binary(max_size=24) | st.text(max_size=12) | st.booleans() | st.none() | _simple | floats


def _tree(floats):
    return st.recursive(
        _leaves(floats),
        lambda kids: st.lists(kids, max_size=5)
        | st.dictionaries(_keys, kids, max_size=5)
        | st.builds(cbor2.CBORTag, _other_tags, kids),
        max_leaves=16,
    ).filter(lambda v: _depth(v) <= MAX_DEPTH)


def _depth(v):
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, [*v.keys(), *v.values()]), default=0)
    if isinstance(v, cbor2.CBORTag):
        return 1 + _depth(v.value)
    return 1


values = _tree(st.floats())
finite_values = _tree(st.floats(allow_nan=False, allow_infinity=False))
batches = st.lists(values, min_size=1, max_size=20)


def ordered(v):
    """v with every map's keys inserted in RFC 8949 4.2.1 order (bytewise order
    of the encoded keys), for cbor2's order-preserving encoder."""
    if isinstance(v, list):
        return [ordered(x) for x in v]
    if isinstance(v, dict):
        return {k: ordered(v[k]) for k in sorted(v, key=cbor2.dumps)}
    if isinstance(v, cbor2.CBORTag):
        return cbor2.CBORTag(v.tag, ordered(v.value))
    return v


@given(batch=batches, canonical=st.booleans())
@PROPERTY_SETTINGS
def test_decodes_what_cbor2_encodes(interp, batch, canonical):
    # canonical=True makes cbor2 use the shortest float (half / single / double)
    hexes = [cbor2.dumps(v, canonical=canonical).hex() for v in batch]
    got = interp.call("cbor_checks", "decode_many", hexes)
    for v, h, r in zip(batch, hexes, got, strict=True):
        assert "v" in r, f"{h} ({v!r}) rejected: {r}"
        assert same(to_cbor2(r["v"]), v), f"{h}: expected {v!r}, decoded {r['v']}"


@given(batch=batches)
@PROPERTY_SETTINGS
def test_cbor2_decodes_what_we_encode(interp, batch):
    hexes = interp.call("cbor_checks", "encode_many", pack([from_cbor2(v) for v in batch]))
    for v, h in zip(batch, hexes, strict=True):
        assert same(cbor2.loads(bytes.fromhex(h)), v), f"{v!r} encoded as {h}"
    # and our own decoder reads it back
    back = interp.call("cbor_checks", "decode_many", hexes)
    for v, r in zip(batch, back, strict=True):
        assert "v" in r and same(to_cbor2(r["v"]), v), r


@given(batch=st.lists(finite_values, min_size=1, max_size=20))
@PROPERTY_SETTINGS
def test_encoding_is_cbor2s_with_keys_in_deterministic_order(interp, batch):
    # cbor2 writes finite floats as float64 and keeps dict insertion order,
    # so given the keys in RFC 8949 4.2.1 order its bytes must equal ours
    hexes = interp.call("cbor_checks", "encode_many", pack([from_cbor2(v) for v in batch]))
    for v, h in zip(batch, hexes, strict=True):
        assert h == cbor2.dumps(ordered(v)).hex(), f"{v!r}"


@given(
    pairs=st.dictionaries(_keys, st.integers(0, 23), min_size=2, max_size=12),
    order=st.randoms(use_true_random=False),
)
@PROPERTY_SETTINGS
def test_map_key_order_does_not_depend_on_insertion_order(interp, pairs, order):
    items = list(pairs.items())
    order.shuffle(items)
    [h] = interp.call("cbor_checks", "encode_many", pack([["m", [[from_cbor2(k), v] for k, v in items]]]))
    # keys sorted by their encoded bytes (not length first, as cbor2's canonical mode does)
    body = b"".join(kb + bytes([pairs[k]]) for kb, k in sorted((cbor2.dumps(k), k) for k in pairs))
    assert h == (bytes([0xA0 + len(pairs)]) + body).hex()
