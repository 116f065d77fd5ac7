"""Differential fuzz of the permit checker: board (MicroPython) vs host.

Mutated permits (bit flips, byte edits, truncations, insertions, splices of
valid vectors) go through protocol/permit.py inside MicroPython and through
the host's python-cwt based check. Both must give the same reason code, and
the board must never raise: any input ends in a verdict. The CI run is
bounded; VOLTGATE_SLOW=1 runs the long one.
"""

import hashlib
import hmac
import json
import os
import random

import cbor2
import pytest

from voltgate import permits, vectors, wire

CASES = json.loads((vectors.tree.vectors_dir() / "permits.json").read_text())["cases"]
SEEDS = [c for c in CASES if c["expect"] == "ok"]


def mutate(rng: random.Random, token: bytes, donors: list[bytes]) -> bytes:
    b = bytearray(token)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(6)
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 8)))
        elif op == 0:  # bit flip
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # interesting byte
            b[rng.randrange(len(b))] = rng.choice((0x00, 0x17, 0x18, 0x1B, 0x1F, 0x40, 0x5F, 0x7F, 0x80, 0x9F, 0xBF, 0xF4, 0xF7, 0xFF))
        elif op == 2:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 3:  # insert
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 4))
        elif op == 4:  # delete a run
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 5)]
        else:  # splice in part of another vector
            d = rng.choice(donors)
            i, j = sorted(rng.randrange(len(d) + 1) for _ in range(2))
            k = rng.randrange(len(b) + 1)
            b[k:k] = d[i:j]
    return bytes(b)


def run_campaign(mp_worker, seed: int, count: int, batch: int = 250):
    rng = random.Random(seed)
    donors = [bytes.fromhex(c["token"]) for c in CASES]
    disagreements = []
    for start in range(0, count, batch):
        case = rng.choice(SEEDS)
        ctx = vectors.context_from_json(case["env"])
        tokens = [mutate(rng, bytes.fromhex(case["token"]), donors) for _ in range(min(batch, count - start))]
        board = mp_worker.call("permit_checks", "verify_many", [t.hex() for t in tokens], case["env"], case["action"], case["index"])
        for t, b in zip(tokens, board):
            h = permits.verify(t, ctx, case["action"], case["index"]).reason
            if h != b:
                disagreements.append((t.hex(), wire.reason_name(h), wire.reason_name(b)))
    return disagreements


def _check(mp_worker, seed, count):
    bad = run_campaign(mp_worker, seed, count)
    assert not bad, f"seed {seed}: {len(bad)} disagreements (token, host, board), first: {bad[:3]}"


def test_board_and_host_agree_on_mutated_permits(mp_worker):
    _check(mp_worker, seed=20261124, count=3000)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOLTGATE_SLOW"), reason="long fuzz run: set VOLTGATE_SLOW=1")
def test_board_and_host_agree_long_run(mp_worker):
    seed = int(os.environ.get("VOLTGATE_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
    _check(mp_worker, seed=seed, count=int(os.environ.get("VOLTGATE_FUZZ_COUNT", "100000")))


def test_mutator_reaches_every_stage_of_the_check(mp_worker):
    """The campaign is only worth something if mutations get past parsing:
    the verdicts it produces must span structure, alg, MAC and claim checks."""
    rng = random.Random(7)
    donors = [bytes.fromhex(c["token"]) for c in CASES]
    case = SEEDS[0]
    tokens = [mutate(rng, bytes.fromhex(case["token"]), donors).hex() for _ in range(1500)]
    seen = {wire.reason_name(r) for r in mp_worker.call("permit_checks", "verify_many", tokens, case["env"], case["action"], case["index"])}
    assert {"malformed", "bad_mac", "bad_alg"} <= seen


# --- past the MAC: mutations the test key re-MACs, and ones that need no key


def remac(rng: random.Random, token: bytes, key: bytes, donors: list[bytes]) -> bytes:
    """Mutate the claims or the protected header, then MAC it again with the
    device key, as a server bug (or a stolen key) would: what the claim
    checks and header rules see."""
    obj = cbor2.loads(token)
    if obj.tag == wire.TAG_CWT:
        obj = obj.value
    prot, unprot, payload, tag = obj.value
    if rng.random() < 0.75:
        payload = mutate(rng, payload, donors)
    else:
        prot = mutate(rng, prot, [cbor2.dumps({1: a}) for a in (4, 5, 5.0, -7, "5", True, [5])])
    tag_len = len(tag)
    mac = hmac.new(key, cbor2.dumps(["MAC0", prot, b"", payload]), hashlib.sha256).digest()[:tag_len]
    return cbor2.dumps(cbor2.CBORTag(wire.TAG_MAC0, [prot, unprot, payload, mac]))


UNPROTECTED_VALUES = [cbor2.CBORTag(2, b"\x01"), cbor2.CBORTag(1, 5), cbor2.CBORTag(37, bytes(16)), 1.5, float("nan"), [1], [], {}, {1: 2}, "x", b"", None, True, -1, 2**64 - 1]


def unprotected_only(rng: random.Random, token: bytes) -> bytes:
    """Add, change or drop unprotected header entries of a valid token:
    anyone can, no key needed. The verdict must be ok or malformed."""
    obj = cbor2.loads(token)
    if obj.tag == wire.TAG_CWT:
        obj = obj.value
    prot, unprot, payload, tag = obj.value
    unprot = dict(unprot)
    for _ in range(rng.randrange(1, 3)):
        label = rng.choice([wire.HDR_KID, wire.HDR_ALG, wire.HDR_CRIT, 3, 5, 99, -1, -70000, "kid"])
        if rng.random() < 0.2:
            unprot.pop(label, None)
        else:
            unprot[label] = rng.choice(UNPROTECTED_VALUES + [bytes([rng.randrange(256)])])
    return cbor2.dumps(cbor2.CBORTag(wire.TAG_MAC0, [prot, unprot, payload, tag]))


def _agree(mp_worker, case, tokens):
    ctx = vectors.context_from_json(case["env"])
    board = mp_worker.call("permit_checks", "verify_many", [t.hex() for t in tokens], case["env"], case["action"], case["index"])
    host = [permits.verify(t, ctx, case["action"], case["index"]).reason for t in tokens]
    bad = [(t.hex(), wire.reason_name(h), wire.reason_name(b)) for t, h, b in zip(tokens, host, board) if h != b]
    return board, bad


def test_board_and_host_agree_past_the_mac(mp_worker):
    rng = random.Random(9052)
    donors = [bytes.fromhex(c["token"]) for c in CASES]
    seen = set()
    for case in SEEDS:
        key = bytes.fromhex(next(iter(case["env"]["keys"].values())))
        tokens = [remac(rng, bytes.fromhex(case["token"]), key, donors) for _ in range(250)]
        board, bad = _agree(mp_worker, case, tokens)
        assert not bad, f"{len(bad)} disagreements (token, host, board), first: {bad[:3]}"
        seen |= {wire.reason_name(r) for r in board}
    # the campaign reaches the claim checks, not just the parser
    assert {"ok", "malformed", "bad_alg", "wrong_audience", "expired"} <= seen, seen


def test_unprotected_header_changes_never_pass_as_anything_else(mp_worker):
    rng = random.Random(3)
    for case in SEEDS:
        tokens = [unprotected_only(rng, bytes.fromhex(case["token"])) for _ in range(150)]
        board, bad = _agree(mp_worker, case, tokens)
        assert not bad, f"{len(bad)} disagreements (token, host, board), first: {bad[:3]}"
        assert {wire.reason_name(r) for r in board} <= {"ok", "malformed", "bad_alg", "unknown_key", "bad_mac", "too_large"}
