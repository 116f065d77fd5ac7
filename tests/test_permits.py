"""Permits: host issuing (python-cwt), board verification (MicroPython), shared vectors."""

import json
import os
import time

import pytest
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from voltgate import keys, permits, vectors, wire

PERMITS = vectors.tree.vectors_dir() / "permits.json"
CASES = json.loads(PERMITS.read_text())["cases"]


def test_vector_file_is_what_the_generator_makes():
    assert vectors.main(["--check"]) == 0, "run: python -m voltgate.vectors"


# verdicts the board's stores give, not permit.verify (tests/test_platform.py)
PLATFORM_ONLY = {"store_full", "store_lost", "unavailable"}


def test_every_reason_code_has_a_vector():
    covered = {c["expect"] for c in CASES}
    assert covered == set(wire.REASON_NAMES) - PLATFORM_ONLY


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_host_verdict(case):
    v = permits.verify(bytes.fromhex(case["token"]), vectors.context_from_json(case["env"]), case["action"], case["index"])
    assert v.reason_name == case["expect"]
    assert (wire.json_form(v.claims) if v.claims is not None else None) == case["claims"]


def test_board_verdicts_on_every_vector(interp):
    results = interp.call("permit_checks", "run_vectors", str(PERMITS))
    assert [r["name"] for r in results] == [c["name"] for c in CASES]
    for case, got in zip(CASES, results):
        assert wire.reason_name(got["reason"]) == case["expect"], case["name"]
        assert got["claims"] == case["claims"], case["name"]


def test_vectors_from_mpy_under_heap_limit(mp, tmp_path):
    """The compiled modules, as a board runs them, within the outlet's 64 KB
    heap budget, reading one vector at a time (the test helpers vgenv and
    vgverify are compiled from source on the spot, which costs heap too)."""
    lines = tmp_path / "cases.jsonl"
    lines.write_text("".join(json.dumps(c) + "\n" for c in CASES))
    res = mp.run(script=str(vectors.tree.root() / "host/voltgate/mpside/vgverify.py"), args=[lines], compiled=True, heapsize=64 * 1024)
    got = {r["name"]: wire.reason_name(r["reason"]) for r in res.records}
    assert got == {c["name"]: c["expect"] for c in CASES}


def _pycose_ok(token: bytes, key: bytes) -> bool:
    msg = Mac0Message.decode(token)
    msg.key = SymmetricKey(k=key)
    return msg.verify_tag()


@pytest.mark.parametrize("case", [c for c in CASES if c["expect"] == "ok" and not c["token"].startswith("d83d")], ids=lambda c: c["name"])
def test_valid_vectors_verify_with_pycose_too(case):
    """A second COSE library accepts the MACs: the format is standard."""
    key = bytes.fromhex(next(iter(case["env"]["keys"].values())))
    assert _pycose_ok(bytes.fromhex(case["token"]), key)
    assert not _pycose_ok(bytes.fromhex(case["token"]), os.urandom(32))


def test_permit_issued_now_verifies_inside_micropython(interp):
    master = os.urandom(32)
    key = keys.derive_device_key(master, "station-a", 3)
    now = int(time.time())
    env = {"device_id": "station-a", "keys": {keys.kid_for(3).hex(): key.hex()}, "now": now}
    for alg in (wire.ALG_HMAC256_64, wire.ALG_HMAC256_256):
        token = permits.issue(key, 3, alg=alg, device_id="station-a", user_id="u-1", action="rent", not_before=now - 60, expires=now + 600, issued_at=now)
        got = interp.call("permit_checks", "verify", token.hex(), env, wire.ACTION_RENT, 2)
        assert wire.reason_name(got["reason"]) == "ok"
        assert got["claims"][str(wire.CLAIM_SUB)] == "u-1"
        # the same permit is refused by another station holding its own key
        other = keys.derive_device_key(master, "station-b", 3)
        env_b = {"device_id": "station-b", "keys": {keys.kid_for(3).hex(): other.hex()}, "now": now}
        assert wire.reason_name(interp.call("permit_checks", "verify", token.hex(), env_b)["reason"]) == "bad_mac"


def test_permit_sizes_fit_a_qr_code():
    key = os.urandom(32)
    args = dict(device_id="vg-outlet-0001", user_id="user-000123", action="power", not_before=1_800_000_000, expires=1_800_003_600, issued_at=1_800_000_000, scope=[0], max_wh=2000)
    t5 = permits.issue(key, 1, alg=wire.ALG_HMAC256_256, **args)
    t4 = permits.issue(key, 1, alg=wire.ALG_HMAC256_64, **args)
    # 32- vs 8-byte tag (24 bytes) and its bstr head (0x58 0x20 vs 0x48): nothing else differs
    assert len(t5) - len(t4) == 25
    assert len(t5) <= 154  # a version-7 QR code in byte mode at level L
    assert len(t4) <= 122  # ... and at level M


def test_issue_rejects_bad_requests():
    key = os.urandom(32)
    with pytest.raises(permits.VoltgateError, match="unknown action"):
        permits.issue(key, 1, device_id="d", user_id="u", action="fly", expires=10)
    with pytest.raises(permits.VoltgateError, match="needs an end"):
        permits.issue(key, 1, device_id="d", user_id="u", action="rent")
    with pytest.raises(permits.VoltgateError, match="window is empty"):
        permits.issue(key, 1, device_id="d", user_id="u", action="rent", not_before=10, expires=10)
    with pytest.raises(permits.VoltgateError, match="invalid device id"):
        permits.issue(key, 1, device_id="a/b", user_id="u", action="rent", expires=10)


def test_key_derivation_is_per_device_and_version():
    m = bytes(range(32))
    k = keys.derive_device_key(m, "dev-1", 1)
    assert len(k) == 32
    assert k == keys.derive_device_key(m, "dev-1", 1)
    assert len({k, keys.derive_device_key(m, "dev-2", 1), keys.derive_device_key(m, "dev-1", 2)}) == 3
    assert keys.kid_for(1) == b"\x01" and keys.kid_for(300) == b"\x01\x2c"
    assert keys.version_of(keys.kid_for(300)) == 300 and keys.version_of(b"\x00\x01") is None


def test_permit_check_allocates_under_budget(mp):
    """DESIGN.md budget: a permit check allocates under 4 KB (counted with
    micropython.mem_total, from the .mpy build, in the outlet's 64 KB heap)."""
    case = CASES[0]
    code = (
        "import json, micropython, gc\n"
        "from binascii import unhexlify\n"
        "import permit\nfrom vgenv import DictEnv\nfrom vgemit import emit\n"
        "c = json.loads(%r)\n"
        "env = DictEnv(c['env']); tok = unhexlify(c['token'])\n"
        "permit.verify(tok, env, 3, 1)\n"
        "gc.collect(); a = micropython.mem_total()\n"
        "for i in range(20):\n    r = permit.verify(tok, env, 3, 1)[0]\n"
        "emit({'reason': r, 'per_check': (micropython.mem_total() - a) // 20})\n"
    ) % json.dumps(case)
    rec = mp.run(code=code, compiled=True, heapsize=64 * 1024).record
    assert rec["reason"] == wire.OK
    assert 0 < rec["per_check"] < 4096
