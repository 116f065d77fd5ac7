"""Decoder fuzz of protocol/cbor.py on CPython and MicroPython.

Mutations of the vectors in protocol/vectors/cbor.json (bit flips, byte edits,
truncations, deletions, insertions of random bytes and of extreme heads,
splices, wrapping in containers) and random bytes go to cbor.loads in batches.
The only acceptable outcomes are a value or a CBORError: any other exception
fails with the input hex and the seed. A decoded value must re-encode stably
and hold only valid UTF-8 text (tests/mp/cbor_checks.py fuzz()). The two
interpreters must agree on every input, and accept nothing cbor2 rejects.

Bounded by default; VOLTGATE_SLOW=1 runs the long campaign (seed from
VOLTGATE_FUZZ_SEED or random, printed on failure; size VOLTGATE_FUZZ_COUNT).

On MicroPython each chunk of inputs runs in a one-shot interpreter (mp.run),
not in the long-lived `interp` worker: a map holding a bytes and a str key of
the same content (b"" and "", easily made by a bit flip) makes the unix port
print "Warning: Comparison between bytes and str" to stderr, the worker's
stderr pipe is never read, and some thousands of those warnings fill it and
hang the worker. mp.run collects stderr, and a fresh process per chunk keeps
one bad input from taking the others down.
A separate one-shot MicroPython run under a 32 KB heap feeds inputs that
declare huge lengths and counts: they must fail with CBORError, never
MemoryError, and allocate no more than a small fixed amount.
"""

from __future__ import annotations

import json
import os
import random

import cbor2
import pytest
from test_cbor import CBOR2_SEMANTIC_TAGS, same, to_cbor2

from voltgate import tree
from voltgate.mpy import MicroPythonError

VECTORS = json.loads((tree.vectors_dir() / "cbor.json").read_text(encoding="utf-8"))
SEEDS = [bytes.fromhex(v["hex"]) for v in VECTORS["valid"] + VECTORS["malformed"]]
DEFAULT_SEED = 20261124

# Heads that stress the decoder's bounds: extreme arguments of every width,
# indefinite and reserved additional information, lone breaks.
HEADS = [
    bytes.fromhex(h)
    for h in (
        "17 18ff 19ffff 1affffffff 1bffffffffffffffff 3bffffffffffffffff 1c 1d 1e 1f 3f ff "
        "58ff 597fff 5affffffff 5bffffffffffffffff 5b7fffffffffffffff 7bffffffffffffffff 7a7fffffff "
        "98ff 99ffff 9affffffff 9bffffffffffffffff b8ff bbffffffffffffffff bb7fffffffffffffff "
        "c1 d8ff dbffffffffffffffff 5f 7f 9f bf df f7 f8 f800 f81f f820 f9 fa fb f97e00 "
        "a0 80 40 60 61ff 62c328 63eda080 62c0af 64f4908080"
    ).split()
]
BYTES = (0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1F, 0x20, 0x40, 0x5B, 0x5F, 0x60, 0x7B, 0x7F, 0x80, 0x81, 0x9B, 0x9F)
BYTES += (0xA0, 0xA1, 0xBB, 0xBF, 0xC0, 0xC1, 0xD1, 0xDB, 0xE0, 0xF4, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFF)
WRAPPERS = [bytes.fromhex(h) for h in ("81", "82f6", "a100", "a16161", "c1", "d1", "d83d", "9801", "8181818181818181818181818181")]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(10)
        if not b:
            b = bytearray(rng.choice(SEEDS) or rng.randbytes(rng.randrange(1, 8)))
        elif op == 0:  # bit flip
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:  # interesting byte
            b[rng.randrange(len(b))] = rng.choice(BYTES)
        elif op == 2:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 3:  # delete a run
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 5)]
        elif op == 4:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 5))
        elif op in (5, 6):  # insert an extreme head
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice(HEADS)
        elif op == 7:  # splice: our prefix, another input's suffix
            d = rng.choice(SEEDS)
            b = b[: rng.randrange(len(b) + 1)] + d[rng.randrange(len(d) + 1) :]
        elif op == 8:  # duplicate a run
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randrange(1, 9))
            b[j:j] = b[i:j]
        else:  # wrap in a container or tag
            b = bytearray(rng.choice(WRAPPERS)) + b
    return bytes(b)


def fuzz_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.12:
            out.append(rng.randbytes(rng.randrange(0, 24)))
        else:
            out.append(mutate(rng, rng.choice(SEEDS)))
    return out


CHUNK = 5000
RUNNER = """
import json
import sys
import cbor_checks
from vgemit import emit

with open(sys.argv[1]) as f:
    emit(cbor_checks.fuzz(json.load(f)))
"""


class Fuzzer:
    """cbor_checks.fuzz on one interpreter, a chunk of inputs at a time."""

    def __init__(self, name: str, mp=None, tmp_path=None):
        self.name = name
        self._mp = mp
        self._file = tmp_path / "fuzz-inputs.json" if tmp_path else None

    def __repr__(self):
        return self.name

    def _run(self, hexes: list[str]) -> list[dict]:
        if self.name == "cpython":
            import cbor_checks

            return json.loads(json.dumps(cbor_checks.fuzz(hexes)))
        self._file.write_text(json.dumps(hexes))
        # compiled: the decoder under test is the cbor.mpy that boards run
        return self._mp.run(code=RUNNER, args=[self._file], heapsize=16 * 1024 * 1024, timeout=60, compiled=True).record

    def fuzz(self, seed: int, inputs: list[bytes]) -> list[dict]:
        out = []
        for start in range(0, len(inputs), CHUNK):
            hexes = [b.hex() for b in inputs[start : start + CHUNK]]
            try:
                out += self._run(hexes)
            except MicroPythonError as e:
                raise AssertionError(f"seed {seed}: {self._culprit(hexes, e)}") from None
        return out

    def _culprit(self, hexes, err):
        # the interpreter itself failed (crashed, hung, ran out of heap): bisect
        while len(hexes) > 1:
            half = hexes[: len(hexes) // 2]
            try:
                self._run(half)
            except MicroPythonError as e:
                hexes, err = half, e
                continue
            rest = hexes[len(hexes) // 2 :]
            try:
                self._run(rest)
            except MicroPythonError as e:
                hexes, err = rest, e
                continue
            return f"{len(hexes)} inputs together broke MicroPython, no half of them alone does: {err}"
        return f"input {hexes[0]} broke MicroPython: {err}"


@pytest.fixture(params=["cpython", "micropython"])
def fuzzer(request, tmp_path):
    if request.param == "cpython":
        return Fuzzer("cpython")
    return Fuzzer("micropython", request.getfixturevalue("mp"), tmp_path)


def run_campaign(fuzzer: Fuzzer, seed: int, count: int) -> dict:
    inputs = fuzz_inputs(seed, count)
    outcomes = {"v": 0, "err": 0}
    crashes = []
    for data, r in zip(inputs, fuzzer.fuzz(seed, inputs), strict=True):
        if "crash" in r:
            crashes.append((data.hex(), r))
        else:
            outcomes["v" if "v" in r else "err"] += 1
    if crashes:
        h, r = crashes[0]
        raise AssertionError(
            f"seed {seed} on {fuzzer}: {len(crashes)} of {count} inputs did not end in a value or a CBORError; "
            f"inputs: {[c[0] for c in crashes[:10]]}\nfirst, input {h}: {r['crash']}: {r['msg']}\n{r['tb']}"
        )
    return outcomes


def _seed() -> int:
    return int(os.environ.get("VOLTGATE_FUZZ_SEED", DEFAULT_SEED))


def test_mutate_is_reproducible_and_varied():
    a, b = fuzz_inputs(7, 300), fuzz_inputs(7, 300)
    assert a == b and a != fuzz_inputs(8, 300)
    assert len(set(a)) > 250


def test_fuzzed_decoder_only_returns_values_or_cbor_errors(fuzzer):
    seed = _seed()
    outcomes = run_campaign(fuzzer, seed, count=20000)
    # the mix must exercise both paths, or the fuzz proves little
    assert outcomes["v"] > 0.05 * 20000 and outcomes["err"] > 0.5 * 20000, f"seed {seed}: {outcomes}"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOLTGATE_SLOW"), reason="long fuzz run: set VOLTGATE_SLOW=1")
def test_fuzzed_decoder_long_run(fuzzer):
    seed = int(os.environ.get("VOLTGATE_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
    run_campaign(fuzzer, seed, count=int(os.environ.get("VOLTGATE_FUZZ_COUNT", "1000000")))


def _nan_free(j):
    """Typed JSON with every NaN float spelled the same (payloads may differ)."""
    if isinstance(j, list):
        if j[0] == "f":
            x = to_cbor2(j)
            return ["f", "nan"] if x != x else j
        if j[0] == "t":
            return ["t", j[1], _nan_free(j[2])]
        if j[0] == "a":
            return ["a", [_nan_free(x) for x in j[1]]]
        if j[0] == "m":
            return ["m", [[_nan_free(k), _nan_free(v)] for k, v in j[1]]]
    return j


def _tags(j):
    if isinstance(j, list):
        if j[0] == "t":
            yield j[1]
            yield from _tags(j[2])
        elif j[0] == "a":
            for x in j[1]:
                yield from _tags(x)
        elif j[0] == "m":
            for k, x in j[1]:
                yield from _tags(k)
                yield from _tags(x)


def test_interpreters_agree_with_each_other_and_cbor2_on_fuzz_inputs(mp, tmp_path):
    check_agreement(mp, tmp_path, _seed() + 1, 10000)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOLTGATE_SLOW"), reason="long fuzz run: set VOLTGATE_SLOW=1")
def test_interpreters_agree_long_run(mp, tmp_path):
    seed = int(os.environ.get("VOLTGATE_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
    check_agreement(mp, tmp_path, seed, int(os.environ.get("VOLTGATE_FUZZ_COUNT", "1000000")) // 4)


def check_agreement(mp, tmp_path, seed: int, count: int):
    inputs = fuzz_inputs(seed, count)
    board = Fuzzer("micropython", mp, tmp_path).fuzz(seed, inputs)
    host = Fuzzer("cpython").fuzz(seed, inputs)
    for data, b, h in zip(inputs, board, host, strict=True):
        where = f"seed {seed}, input {data.hex()}"
        assert "crash" not in b and "crash" not in h, f"{where}: MicroPython {b}, CPython {h}"
        # same value (NaN payloads aside) or the same error message, offset included
        if "v" in b:
            assert "v" in h and _nan_free(b["v"]) == _nan_free(h["v"]), f"{where}: MicroPython {b}, CPython {h}"
        else:
            assert b == h, f"{where}: MicroPython {b}, CPython {h}"
        try:
            theirs = cbor2.loads(data)
        except Exception:  # cbor2 raises CBORDecodeError and, on bad tag content, others
            # we are the stricter decoder, except inside tags whose content cbor2 checks
            assert "err" in h or any(t in CBOR2_SEMANTIC_TAGS for t in _tags(h["v"])), f"{where}: cbor2 rejects, we accept {h}"
            continue
        if "v" in h and not any(t in CBOR2_SEMANTIC_TAGS for t in _tags(h["v"])):
            assert same(theirs, to_cbor2(h["v"])), f"{where}: cbor2 gives {theirs!r}, we give {h['v']}"


# ---------------------------------------------------------------- under a small heap

HEAP_SCRIPT = r"""
import gc
import random
from binascii import hexlify
import cbor
from vgemit import emit

LIMIT = %(limit)d
random.seed(%(seed)d)

# the heap is big enough for real work: a 4 KB byte string decodes
try:
    big = len(cbor.loads(b"\x59\x10\x00" + bytes(4096)))
except MemoryError:
    big = "MemoryError"

# every length/count-bearing major type with its largest argument in each width
# (and just below the signed limit), inside a few containers, with some padding
heads = []
for major in (2, 3, 4, 5):
    for ai in (24, 25, 26, 27):
        size = 1 << (ai - 24)
        heads.append(bytes([major << 5 | ai]) + b"\xff" * size)
        heads.append(bytes([major << 5 | ai]) + b"\x7f" + b"\xff" * (size - 1))
prefixes = (b"", b"\x81", b"\x82\x00", b"\xa1\x00", b"\xa1\x61\x61", b"\xc1", b"\xd8\x3d\xd1", b"\x81" * 14, b"\xa1\x00" * 7)
pads = (b"", b"\x00", b"\x00" * 7, b"\xff" * 33)

bad = []  # the first few failures (more would crowd the heap)
nbad = 0
peak = 0
n = 0


def check(data, must_fail):
    global peak, n, nbad
    n += 1
    gc.collect()
    before = gc.mem_alloc()
    try:
        cbor.loads(data)
        outcome = "value"
    except cbor.CBORError:
        outcome = "CBORError"
    except MemoryError:  # caught so that every input gets its report
        outcome = "MemoryError"
    except Exception as e:
        outcome = "%%s: %%s" %% (type(e).__name__, e)
    used = gc.mem_alloc() - before
    if used > peak:
        peak = used
    if outcome not in ("value", "CBORError") or (must_fail and outcome != "CBORError") or used > LIMIT:
        nbad += 1
        if len(bad) < 8:
            bad.append([hexlify(data[:48]).decode(), len(data), outcome, used])


for p in prefixes:
    for h in heads:
        for pad in pads:
            check(p + h + pad, True)

# deep nesting must stop at the depth limit, not in a recursion or memory error
for unit in (b"\x81", b"\xa1\x00", b"\xc1", b"\xd8\x3d"):
    gc.collect()
    check(unit * 300 + b"\x00", True)

# random inputs with a huge head spliced in at a random place
base = (b"\xd8\x3d\xd1\x84\x43\xa1\x01\x05\xa1\x04\x41\x31\xf6\x41\x01", b"\x83\x01\x82\x02\x03\x82\x04\x05",
        b"\xa2\x61\x61\x01\x61\x62\x82\x02\x03", b"\x64\x49\x45\x54\x46")
for i in range(%(rounds)d):
    b = base[random.getrandbits(2)]
    k = random.getrandbits(4) %% (len(b) + 1)
    check(b[:k] + heads[random.getrandbits(5)] + b[k:], False)

emit({"n": n, "nbad": nbad, "bad": bad, "peak": peak, "big": big})
"""


def test_huge_declared_lengths_fail_cleanly_in_a_32k_heap(mp):
    limit = 3 * 1024  # bytes one rejected input may allocate (exception, message, traceback)
    res = mp.run(code=HEAP_SCRIPT % {"limit": limit, "seed": _seed(), "rounds": 2000}, heapsize=32 * 1024, compiled=True)
    rec = res.record
    assert rec["big"] == 4096, "a 4 KB byte string must decode in this heap"
    assert rec["n"] == 9 * 32 * 4 + 4 + 2000
    assert rec["nbad"] == 0, f"seed {_seed()}: {rec['nbad']} inputs failed; the first (hex, length, outcome, bytes allocated): {rec['bad']}"
    assert 0 < rec["peak"] <= limit
