"""Generate protocol/vectors/permits.json: permits with the verdict a board must give.

    python -m voltgate.vectors            rewrite the file
    python -m voltgate.vectors --check    exit 1 if the file is not what this makes

Valid permits come from the real issuer (python-cwt). Attack tokens are built
by hand with cbor2 and hmac, because a COSE library refuses to make them.
Everything is deterministic (fixed key material, ids and times), so the file
only changes when the contract does. The key material is a published test
value, not a secret: no board is ever provisioned from it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys

import cbor2

from . import keys, permits, tree, wire

TEST_MASTER = hashlib.sha256(b"voltgate public test-vector master (not a secret)").digest()
DEVICE = "vg-test-outlet-01"
OTHER = "vg-test-outlet-02"
USER = "user-0042"
NOW = 1_800_000_000  # 2027-01-15T08:00:00Z
HOUR = 3600


def _key(device=DEVICE, version=1):
    return keys.derive_device_key(TEST_MASTER, device, version)


def _env(**over):
    env = {
        "device_id": DEVICE,
        "keys": {keys.kid_for(1).hex(): _key().hex()},
        "has_key": True,
        "now": NOW,
        "leeway": 0,
        "revoked_ctis": [],
        "revoked_users": [],
        "used_ctis": [],
        "exi_elapsed": {},
    }
    env.update(over)
    return env


def _claims(n: int, **over) -> dict:
    args = dict(
        device_id=DEVICE,
        user_id=USER,
        action="power",
        not_before=NOW - HOUR,
        expires=NOW + HOUR,
        issued_at=NOW - HOUR,
        scope=[0, 1],
        max_wh=2000,
        max_w=3500,
        cti=bytes([0xC0, 0, 0, 0, 0, 0, 0, n]),
    )
    args.update(over)
    return permits.build_claims(**args)


def _cti(n: int) -> str:
    return bytes([0xC0, 0, 0, 0, 0, 0, 0, n]).hex()


def _issue(n, alg=wire.ALG_HMAC256_256, key=None, cwt_tag=False, key_version=1, **over) -> bytes:
    return permits.mac_claims(_claims(n, **over), key or _key(), key_version, alg, cwt_tag)


def _raw(protected, unprotected, payload: bytes, key: bytes | None = None, tag_len=32, tag: bytes | None = None, tags=(wire.TAG_MAC0,)) -> bytes:
    """A COSE_Mac0 built by hand: protected may be a map or raw bytes."""
    prot = protected if isinstance(protected, bytes) else cbor2.dumps(protected)
    if tag is None:
        mac_structure = cbor2.dumps(["MAC0", prot, b"", payload])
        tag = hmac.new(key or _key(), mac_structure, hashlib.sha256).digest()[:tag_len]
    obj = [prot, unprotected, payload, tag]
    for t in reversed(tags):
        obj = cbor2.CBORTag(t, obj)
    return cbor2.dumps(obj)


def _split(token: bytes):
    return cbor2.loads(token).value


def build() -> dict:
    kid1 = keys.kid_for(1)
    cases = []

    def add(name, token, expect, description, env=None, action=wire.ACTION_POWER, index=0):
        cases.append(
            {
                "name": name,
                "description": description,
                "token": token.hex(),
                "env": env or _env(),
                "action": action,
                "index": index,
                "expect": expect,
            }
        )

    good5 = _issue(1)
    good4 = _issue(2, alg=wire.ALG_HMAC256_64)
    add("ok_hmac256_256", good5, "ok", "alg 5, power on outlet 1 of scope [0, 1] inside the window", index=1)
    add("ok_hmac256_64", good4, "ok", "alg 4 (compact, 64-bit tag)")
    add("ok_cwt_tag61", _issue(3, cwt_tag=True), "ok", "COSE_Mac0 inside the CWT tag 61")
    add("ok_many_uses_again", _issue(4, single_use=False), "ok", "a many-use permit presented again", env=_env(used_ctis=[_cti(4)]))
    add(
        "ok_exi_untrusted_clock",
        _issue(5, action="rent", not_before=None, expires=NOW + 30 * 24 * HOUR, scope=None, max_wh=None, max_w=None, exi=HOUR),
        "ok",
        "exi permit, never used, board clock not trusted",
        env=_env(now=None),
        action=wire.ACTION_RENT,
        index=3,
    )
    add(
        "ok_exi_in_time",
        _issue(6, action="rent", not_before=None, expires=NOW + 30 * 24 * HOUR, scope=None, exi=HOUR),
        "ok",
        "exi permit first used 3599 s ago",
        env=_env(exi_elapsed={_cti(6): HOUR - 1}),
        action=wire.ACTION_RENT,
    )
    add("ok_leeway", _issue(7, expires=NOW - 10), "ok", "10 s past exp with a leeway of 30 s", env=_env(leeway=30))
    add("ok_at_nbf", _issue(23, not_before=NOW), "ok", "now == nbf")
    add("ok_nbf_within_leeway", _issue(24, not_before=NOW + 20), "ok", "nbf 20 s ahead, leeway 30 s", env=_env(leeway=30))
    add("expired_at_leeway_edge", _issue(25, expires=NOW - 30), "expired", "now - leeway == exp", env=_env(leeway=30))
    add("ok_exi_with_window_untrusted", _issue(26, exi=HOUR), "ok", "nbf, exp and exi; clock not trusted, floor inside the window", env=_env(now=None, floor=NOW - 60))
    add(
        "replayed_exi",
        _issue(27, action="rent", not_before=None, expires=NOW + 30 * 24 * HOUR, scope=None, exi=HOUR),
        "replayed",
        "single-use exi permit presented again within its exi: its first use made it used",
        env=_env(exi_elapsed={_cti(27): 60}, used_ctis=[_cti(27)]),
        action=wire.ACTION_RENT,
    )
    add("ok_any_action_any_index", _issue(8), "ok", "the caller asks for no particular action or index", action=None, index=None)

    # --- MAC failures
    p, u, payload, tag = _split(good5)
    bad = bytearray(payload)
    bad[-1] ^= 0x01  # uses 1 -> 0: single-use made many-use
    add("tampered_payload", _raw(p, u, bytes(bad), tag=tag), "bad_mac", "one payload byte changed, tag kept")
    add("tampered_protected", _raw({wire.HDR_ALG: wire.ALG_HMAC256_256, 3: 0}, u, payload, tag=tag), "bad_mac", "a parameter added to the protected header, tag kept")
    add("tampered_tag", _raw(p, u, payload, tag=bytes([tag[0] ^ 0x80]) + tag[1:]), "bad_mac", "first tag byte flipped")
    p4, u4, payload4, tag4 = _split(good4)
    add("alg_downgrade_5_to_4", _raw({wire.HDR_ALG: wire.ALG_HMAC256_64}, u, payload, tag=tag[:8]), "bad_mac", "alg 5 permit relabelled alg 4 with its tag cut to 8 bytes")
    add("tag_too_short", _raw(p, u, payload, tag=tag[:8]), "bad_mac", "alg 5 with an 8-byte tag")
    add("tag_empty", _raw(p, u, payload, tag=b""), "bad_mac", "alg 5 with an empty tag")
    add("wrong_key", _issue(9, key=_key(OTHER)), "bad_mac", "MACed with another device's key")
    # --- audience and key
    add("wrong_audience", _issue(10, device_id=OTHER), "wrong_audience", "valid MAC, made for another device")
    add("unknown_kid", _issue(11, key=_key(version=2), key_version=2), "unknown_key", "key version 2, board has only version 1")
    add("no_kid", _raw(p, {}, payload), "unknown_key", "no kid in either header")
    add("no_key_on_board", good5, "no_key", "board has no key provisioned", env=_env(has_key=False, keys={}))
    # --- time
    add("expired", _issue(12, expires=NOW), "expired", "now == exp")
    add("not_yet_valid", _issue(13, not_before=NOW + 1), "not_yet_valid", "nbf one second ahead")
    add("time_untrusted", good5, "time_untrusted", "time-bound permit, board clock not trusted", env=_env(now=None))
    add(
        "expired_by_floor",
        _issue(21, action="rent", not_before=None, expires=NOW - 10, scope=None, exi=HOUR),
        "expired",
        "clock not trusted, but its floor is past exp: an exi permit is over too",
        env=_env(now=None, floor=NOW),
        action=wire.ACTION_RENT,
    )
    add("untrusted_floor_before_exp", _issue(22, exi=HOUR), "ok", "clock not trusted, floor before exp, exi permit: ok", env=_env(now=None, floor=NOW - HOUR))
    add(
        "exi_used_up",
        _issue(14, action="rent", not_before=None, expires=NOW + 30 * 24 * HOUR, scope=None, exi=HOUR),
        "expired",
        "exi permit first used an hour ago",
        env=_env(exi_elapsed={_cti(14): HOUR}),
        action=wire.ACTION_RENT,
    )
    # --- revocation, replay, scope
    add("revoked_permit", _issue(15), "revoked", "permit id on the revocation list", env=_env(revoked_ctis=[_cti(15)]))
    add("revoked_user", _issue(16), "revoked", "user on the revocation list", env=_env(revoked_users=[USER]))
    add("replayed", _issue(17), "replayed", "single-use permit already used", env=_env(used_ctis=[_cti(17)]))
    add("wrong_action", _issue(18), "wrong_action", "power permit presented for a rent", action=wire.ACTION_RENT)
    add("out_of_scope", _issue(19), "out_of_scope", "outlet 5 not in scope [0, 1]", index=5)
    # --- structure and size
    add("truncated", good5[:-1], "malformed", "last byte missing")
    add("truncated_head", good5[:3], "malformed", "cut inside the protected header")
    add("empty", b"", "malformed", "no bytes")
    add("trailing_bytes", good5 + b"\x00", "malformed", "a byte after the COSE_Mac0")
    add("oversized", _raw(p, {wire.HDR_KID: kid1, -70000: b"\xaa" * 500}, payload), "too_large", "padded past 512 bytes in the unprotected header")
    add("wrong_tag_sign1", _raw(p, u, payload, tags=(18,)), "malformed", "tag 18 (COSE_Sign1) instead of 17")
    add("untagged", _raw(p, u, payload, tags=()), "malformed", "COSE_Mac0 array without tag 17")
    add("tag61_only", _raw(p, u, payload, tags=(wire.TAG_CWT,)), "malformed", "CWT tag 61 directly on the array")
    add("not_array_of_4", cbor2.dumps(cbor2.CBORTag(17, [p, u, payload])), "malformed", "COSE_Mac0 with 3 members")
    add("protected_not_map", _raw(cbor2.dumps(5), u, payload), "malformed", "protected header is an integer")
    add("crit_header", _raw({wire.HDR_ALG: wire.ALG_HMAC256_256, wire.HDR_CRIT: [99]}, u, payload), "malformed", "critical header parameter 99")
    add("kid_not_bytes", _raw(p, {wire.HDR_KID: "1"}, payload), "malformed", "kid is a text string")
    add("deep_unprotected", _raw(p, {wire.HDR_KID: kid1, 99: [[[[1]]]]}, payload), "malformed", "nested arrays in the unprotected header")
    # --- algorithm attacks
    add("alg_missing", _raw({}, u, payload), "bad_alg", "protected header without alg, valid HMAC-256 tag")
    add("alg_none_style", _raw(b"", {wire.HDR_KID: kid1}, payload, tag=b""), "bad_alg", "empty protected header and empty tag ('none')")
    add("alg_unprotected_only", _raw(b"", {wire.HDR_ALG: wire.ALG_HMAC256_256, wire.HDR_KID: kid1}, payload), "bad_alg", "alg only in the unprotected header")
    add(
        "alg_in_both_buckets",
        _raw(p, {wire.HDR_ALG: wire.ALG_HMAC256_64, wire.HDR_KID: kid1}, payload),
        "malformed",
        "alg in both header buckets (RFC 9052 section 3 forbids any label in both)",
    )
    add("kid_in_both_buckets", _raw({wire.HDR_ALG: wire.ALG_HMAC256_256, wire.HDR_KID: b"\x02"}, u, payload), "malformed", "kid protected and unprotected, disagreeing")
    add("alg_float", _raw(cbor2.dumps({wire.HDR_ALG: 5.0}), u, payload), "bad_alg", "alg 5.0 (a float, equal to 5 in Python)")
    add("tag_in_unprotected", _raw(p, {wire.HDR_KID: kid1, 99: cbor2.CBORTag(2, b"\x01")}, payload), "malformed", "a bignum tag in the unprotected header (no key needed to add it)")
    add("short_key_on_board", good5, "no_key", "the board's key is 16 bytes: no key", env=_env(keys={kid1.hex(): _key()[:16].hex()}))
    add("alg_hs384", _raw({wire.HDR_ALG: 6}, u, payload), "bad_alg", "alg 6 (HMAC 384) is not supported")
    add("alg_es256", _raw({wire.HDR_ALG: -7}, u, payload), "bad_alg", "alg -7 (ES256) is not a MAC")
    add("alg_text", _raw({wire.HDR_ALG: "HS256"}, u, payload), "bad_alg", "alg given as text")
    # --- MAC-valid tokens with bad claims (a broken issuer, or a stolen key)
    c = _claims(20)
    add("payload_not_map", _raw(p, u, cbor2.dumps([1, 2])), "malformed", "claims are an array")
    add("payload_not_cbor", _raw(p, u, b"\xff\xff"), "malformed", "claims are not CBOR")
    for name, drop, why in (
        ("missing_aud", wire.CLAIM_AUD, "no aud"),
        ("missing_cti", wire.CLAIM_CTI, "no permit id"),
        ("missing_action", wire.CLAIM_ACTION, "no action"),
    ):
        cc = dict(c)
        del cc[drop]
        add(name, _raw(p, u, cbor2.dumps(cc)), "malformed", why)
    cc = {k: v for k, v in c.items() if k != wire.CLAIM_EXP}
    cc[wire.CLAIM_EXI] = HOUR
    add("no_exp", _raw(p, u, cbor2.dumps(cc)), "malformed", "exi but no exp: every permit ends")
    for name, key_, val, why in (
        ("bad_action", wire.CLAIM_ACTION, 9, "action 9 is unknown"),
        ("exp_negative", wire.CLAIM_EXP, -1, "exp is negative"),
        ("exp_text", wire.CLAIM_EXP, "soon", "exp is text"),
        ("cti_too_long", wire.CLAIM_CTI, b"\x01" * 33, "permit id of 33 bytes"),
        ("scope_not_list", wire.CLAIM_SCOPE, 1, "scope is an integer"),
        ("uses_two", wire.CLAIM_USES, 2, "uses must be 0 or 1"),
        ("sub_too_long", wire.CLAIM_SUB, "u" * 65, "user id of 65 characters"),
        ("sub_too_many_bytes", wire.CLAIM_SUB, "\u00e9" * 33, "user id of 33 characters, 66 bytes"),
        ("uses_true", wire.CLAIM_USES, True, "uses is a boolean"),
        ("exp_bignum", wire.CLAIM_EXP, cbor2.CBORTag(2, b"\x6b\x49\xd2\x00"), "exp as a bignum tag"),
    ):
        cc = dict(c)
        cc[key_] = val
        add(name, _raw(p, u, cbor2.dumps(cc)), "malformed", why)

    for case in cases:
        case["expect_code"] = wire.REASON_CODES[case["expect"]]
        ctx = context_from_json(case["env"])
        v = permits.verify(bytes.fromhex(case["token"]), ctx, case["action"], case["index"])
        if v.reason_name != case["expect"]:
            raise AssertionError(f"vector {case['name']}: host says {v.reason_name}, expected {case['expect']}")
        case["claims"] = wire.json_form(v.claims) if v.claims is not None else None
    return {
        "comment": "Permit test vectors (protocol/SPEC.md, Permits). Generated by python -m voltgate.vectors; do not edit by hand.",
        "test_master_hex": TEST_MASTER.hex(),
        "device_id": DEVICE,
        "cases": cases,
    }


def context_from_json(env: dict) -> permits.CheckContext:
    """The host CheckContext for the JSON env form shared with the board (vgenv.py)."""
    return permits.CheckContext(
        device_id=env["device_id"],
        keys={bytes.fromhex(k): bytes.fromhex(v) for k, v in env.get("keys", {}).items()},
        has_key=env.get("has_key", True),
        now=env.get("now"),
        floor=env.get("floor"),
        leeway=env.get("leeway", 0),
        revoked_ctis={bytes.fromhex(c) for c in env.get("revoked_ctis", [])},
        revoked_users=set(env.get("revoked_users", [])),
        used_ctis={bytes.fromhex(c) for c in env.get("used_ctis", [])},
        exi_elapsed={bytes.fromhex(c): s for c, s in env.get("exi_elapsed", {}).items()},
    )


def render(data: dict) -> str:
    return json.dumps(data, indent=1) + "\n"


def generate(argv, module: str, name: str, make, doc: str) -> int:
    """The command line of a vector generator: write protocol/vectors/<name>,
    or with --check exit 1 when the file is not what make() gives."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = ap.parse_args(argv)
    path = tree.vectors_dir() / name
    text = render(make())
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    return generate(argv, "voltgate.vectors", "permits.json", build, __doc__)


if __name__ == "__main__":
    sys.exit(main())
