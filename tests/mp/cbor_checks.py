# Runs on MicroPython and CPython: the CBOR codec checks of tests/test_cbor.py
# (through the `interp` fixture) and tests/test_cbor_fuzz.py (fuzz(), also in
# one-shot MicroPython runs). Values cross the interpreter boundary in the
# typed JSON form of jv.py; CBOR as hex.
#
# Only cbor.CBORError counts as a clean rejection. decode() lets anything else
# propagate (the harness then fails the test with MicroPython's traceback);
# run_vectors() and fuzz() record it per input instead, with its traceback,
# so one bad input does not hide the others.
import json
import sys
from binascii import hexlify, unhexlify

import cbor
import jv


def _hex(b):
    return hexlify(b).decode()


def decode(h, max_depth=None):
    """{"v": typed JSON value} or {"err": CBORError message}.

    {"bad_text": hex} when the decoder returned a string that is not valid
    UTF-8 (it could not even cross the JSON pipe back to the host)."""
    try:
        if max_depth is None:
            v = cbor.loads(unhexlify(h))
        else:
            v = cbor.loads(unhexlify(h), max_depth)
    except cbor.CBORError as e:
        return {"err": str(e)}
    bad = _bad_text(v)
    if bad is not None:
        return {"bad_text": _hex(bad)}
    return {"v": jv.to_j(v)}


def _bad_text(v):
    """The UTF-8 bytes of the first string inside v that break RFC 3629, or None."""
    if isinstance(v, str):
        try:
            b = v.encode("utf-8")
        except UnicodeError:  # CPython: a lone surrogate
            return v.encode("utf-8", "surrogatepass")
        return None if _utf8_ok(b) else b
    if isinstance(v, (list, tuple)):
        items = v
    elif isinstance(v, dict):
        items = list(v.keys()) + list(v.values())
    elif isinstance(v, cbor.Tag):
        items = [v.value]
    else:
        return None
    for x in items:
        bad = _bad_text(x)
        if bad is not None:
            return bad
    return None


def _utf8_ok(b):
    """RFC 3629 section 4: the test's own UTF-8 check, independent of str()."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            k, lo, hi = 2, 0xA0, 0xBF
        elif c == 0xED:
            k, lo, hi = 2, 0x80, 0x9F
        elif 0xE1 <= c <= 0xEF:
            k, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            k, lo, hi = 3, 0x90, 0xBF
        elif c == 0xF4:
            k, lo, hi = 3, 0x80, 0x8F
        elif 0xF1 <= c <= 0xF3:
            k, lo, hi = 3, 0x80, 0xBF
        else:
            return False
        if i + k >= n or not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += k + 1
    return True


def decode_many(hs):
    return [decode(h) for h in hs]


def encode(j):
    return _hex(cbor.dumps(jv.from_j(j)))


def try_encode(j):
    """{"hex": encoding} or {"err": CBORError message}."""
    try:
        return {"hex": encode(j)}
    except cbor.CBORError as e:
        return {"err": str(e)}


def encode_many(doc):
    """doc: hex of a UTF-8 JSON list of typed JSON values; returns their encodings.

    The values travel as raw UTF-8 inside hex because the worker's JSON pipe
    escapes non-ASCII text as \\uXXXX, and MicroPython's json.loads turns an
    escaped surrogate pair (any character above U+FFFF) into two lone
    surrogates instead of one character."""
    return [encode(j) for j in json.loads(unhexlify(doc).decode())]


def run_vectors(path):
    """Decode every vector of protocol/vectors/cbor.json.

    valid:     {"name", "got": decode() result, "enc": hex of dumps(decoded value) or None}
    malformed: {"name", "got": decode() result}
    Either becomes {"name", "crash", "msg", "tb"} when something other than a
    CBORError escapes, so one broken vector does not hide the others."""
    with open(path) as f:
        vec = json.load(f)
    valid = []
    for t in vec["valid"]:
        valid.append(_guarded(t["name"], _valid, t["hex"]))
    malformed = []
    for t in vec["malformed"]:
        malformed.append(_guarded(t["name"], _malformed, t["hex"]))
    return {"valid": valid, "malformed": malformed}


def _valid(h):
    got = decode(h)
    enc = None
    if "v" in got:
        enc = _hex(cbor.dumps(cbor.loads(unhexlify(h))))
    return {"got": got, "enc": enc}


def _malformed(h):
    return {"got": decode(h)}


def _guarded(name, fn, h):
    try:
        r = fn(h)
    except Exception as e:
        r = _crash(e)
    r["name"] = name
    return r


def _crash(e):
    return {"crash": type(e).__name__, "msg": str(e), "tb": _traceback(e)}


def _traceback(e):
    if hasattr(sys, "print_exception"):  # MicroPython
        import io

        buf = io.StringIO()
        sys.print_exception(e, buf)
        return buf.getvalue()
    import traceback

    return "".join(traceback.format_exception(e))


def fuzz(hs):
    """Feed each input to cbor.loads; one result per input.

    {"v": typed JSON} when it decodes (and then its encoding must decode
    again and re-encode to the same bytes), {"err": message} for a
    CBORError, {"crash": type name, "msg", "tb"} for anything else (an
    AssertionError for text that is not UTF-8 or an unstable re-encoding)."""
    out = []
    for h in hs:
        data = unhexlify(h)
        try:
            try:
                v = cbor.loads(data)
            except cbor.CBORError as e:
                out.append({"err": str(e)})
                continue
            bad = _bad_text(v)
            if bad is not None:
                raise AssertionError("decoded text is not valid UTF-8: %s" % _hex(bad))
            enc = cbor.dumps(v)
            again = cbor.dumps(cbor.loads(enc))
            if again != enc:
                raise AssertionError("re-encoding is unstable: %s then %s" % (_hex(enc), _hex(again)))
            out.append({"v": jv.to_j(v)})
        except Exception as e:
            out.append(_crash(e))
    return out
