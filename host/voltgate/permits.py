"""Permits on the host: issue with python-cwt, decode, and verify.

A permit is a CWT in a COSE_Mac0 (protocol/SPEC.md, Permits). Issuing and
MAC checking go through python-cwt's COSE layer; the claim checks below run
in the same order and give the same reason codes as the board's
protocol/permit.py, and the shared vectors hold both to that.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import cbor2
from cwt import COSE, COSEKey

from . import keys, tree, wire
from .errors import EXIT_USAGE, VoltgateError

ALG_NAMES = {wire.ALG_HMAC256_256: "HMAC 256/256", wire.ALG_HMAC256_64: "HMAC 256/64"}
TAG_LEN = {wire.ALG_HMAC256_256: 32, wire.ALG_HMAC256_64: 8}
CTI_LEN = 8


def _cose_key(key: bytes, alg: int, kid: bytes) -> COSEKey:
    return COSEKey.from_symmetric_key(key, alg=ALG_NAMES[alg], kid=kid)


def build_claims(
    *,
    device_id: str,
    user_id: str | None,
    action: str,
    not_before: int | None = None,
    expires: int | None = None,
    issued_at: int | None = None,
    exi: int | None = None,
    scope: list[int] | None = None,
    max_wh: int | None = None,
    max_w: int | None = None,
    single_use: bool = True,
    cti: bytes | None = None,
    issuer: str | None = None,
) -> dict:
    """The claims map with integer keys (python-cwt drops integer private
    claims when string names are mixed in, so only integers are used).

    iss is left out unless given: a board trusts a permit because of the MAC
    under its own key, not because of a name, and every claim costs bytes on
    a QR code and heap on the board."""
    keys.check_device_id(device_id)
    if action not in wire.ACTION_CODES:
        raise VoltgateError(f"unknown action {action!r}", "one of " + ", ".join(wire.ACTION_CODES), EXIT_USAGE)
    if expires is None and exi is None:
        raise VoltgateError("a permit needs an end", "give an expiry time or exi seconds", EXIT_USAGE)
    if expires is not None and not_before is not None and expires <= not_before:
        raise VoltgateError("the permit window is empty", "expiry must be after not-before", EXIT_USAGE)
    if scope is not None and not 0 < len(scope) <= wire.MAX_SCOPE:
        raise VoltgateError(f"scope must list 1..{wire.MAX_SCOPE} indexes", None, EXIT_USAGE)
    c: dict = {wire.CLAIM_AUD: device_id, wire.CLAIM_CTI: cti if cti is not None else os.urandom(CTI_LEN)}
    if issuer:
        c[wire.CLAIM_ISS] = issuer
    if user_id is not None:
        c[wire.CLAIM_SUB] = user_id
    for k, v in ((wire.CLAIM_EXP, expires), (wire.CLAIM_NBF, not_before), (wire.CLAIM_IAT, issued_at), (wire.CLAIM_EXI, exi)):
        if v is not None:
            if not isinstance(v, int) or v < 0:
                raise VoltgateError(f"claim {k} must be a non-negative integer, got {v!r}", None, EXIT_USAGE)
            c[k] = v
    c[wire.CLAIM_ACTION] = wire.ACTION_CODES[action]
    if scope is not None:
        c[wire.CLAIM_SCOPE] = list(scope)
    limits = {}
    if max_wh is not None:
        limits[wire.LIMIT_WH] = max_wh
    if max_w is not None:
        limits[wire.LIMIT_W] = max_w
    if limits:
        c[wire.CLAIM_LIMITS] = limits
    c[wire.CLAIM_USES] = wire.USES_SINGLE if single_use else wire.USES_MANY
    return c


def mac_claims(claims: dict, key: bytes, key_version: int, alg: int = wire.ALG_HMAC256_256, cwt_tag: bool = False) -> bytes:
    """COSE_Mac0 over the claims, kid = key version, alg protected."""
    if alg not in ALG_NAMES:
        raise VoltgateError(f"unsupported alg {alg}", "4 (HMAC 256/64) or 5 (HMAC 256/256)", EXIT_USAGE)
    kid = keys.kid_for(key_version)
    cose = COSE.new()
    token = cose.encode_and_mac(
        cbor2.dumps(claims),
        _cose_key(key, alg, kid),
        protected={wire.HDR_ALG: alg},
        unprotected={wire.HDR_KID: kid},
    )
    if cwt_tag:
        token = cbor2.dumps(cbor2.CBORTag(wire.TAG_CWT, cbor2.loads(token)))
    if len(token) > wire.MAX_PERMIT:
        raise VoltgateError(f"permit is {len(token)} bytes, boards accept at most {wire.MAX_PERMIT}", "shorten the scope or ids", EXIT_USAGE)
    return token


def issue(key: bytes, key_version: int, alg: int = wire.ALG_HMAC256_256, cwt_tag: bool = False, **claim_args) -> bytes:
    """Make a permit: see build_claims() for the claim arguments."""
    return mac_claims(build_claims(**claim_args), key, key_version, alg, cwt_tag)


# ---------------------------------------------------------------- checking


@dataclass
class CheckContext:
    """What the board would know: mirrors the env of protocol/permit.py."""

    device_id: str
    keys: dict[bytes, bytes] = field(default_factory=dict)  # kid -> key
    now: int | None = None  # None: the clock is not trusted
    leeway: int = 0
    revoked_ctis: set[bytes] = field(default_factory=set)
    revoked_users: set[str] = field(default_factory=set)
    used_ctis: set[bytes] = field(default_factory=set)
    exi_elapsed: dict[bytes, int] = field(default_factory=dict)
    has_key: bool = True


@dataclass
class Verdict:
    reason: int
    claims: dict | None = None
    alg: int | None = None
    kid: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.reason == wire.OK

    @property
    def reason_name(self) -> str:
        return wire.reason_name(self.reason)


class _Malformed(Exception):
    pass


_board_cbor = tree.load_protocol_module("cbor")


def strict_loads(data: bytes, max_depth: int = 16):
    """cbor2.loads, gated by the board's own decoder (protocol/cbor.py).

    cbor2 is lenient where the board is strict (trailing bytes, indefinite
    lengths, duplicate map keys); what the board rejects as malformed, the
    host must too, or `permit verify` would pass tokens a board refuses."""
    try:
        _board_cbor.loads(data, max_depth)
    except _board_cbor.CBORError as e:
        raise _Malformed(str(e)) from None
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises several types for bad input
        raise _Malformed(str(e)) from None
    if fp.tell() != len(data):
        raise _Malformed(f"{len(data) - fp.tell()} trailing bytes")
    return value


def _split(token: bytes):
    obj = strict_loads(token)
    if isinstance(obj, cbor2.CBORTag) and obj.tag == wire.TAG_CWT:
        obj = obj.value
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != wire.TAG_MAC0:
        raise _Malformed("not a COSE_Mac0")
    v = obj.value
    if not isinstance(v, list) or len(v) != 4:
        raise _Malformed("COSE_Mac0 is not an array of 4")
    protected, unprotected, payload, tag = v
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(tag, bytes):
        raise _Malformed("bad COSE_Mac0 member types")
    if not isinstance(unprotected, dict):
        raise _Malformed("unprotected header is not a map")
    prot = strict_loads(protected, 2) if protected else {}
    if not isinstance(prot, dict):
        raise _Malformed("protected header is not a map")
    for hdr in (prot, unprotected):
        # the board decodes header maps two levels deep: values are scalars
        # (or empty containers), as for every header voltgate uses
        if any(isinstance(x, cbor2.CBORTag) or (isinstance(x, (list, dict)) and x) for x in hdr.values()):
            raise _Malformed("nested header value")
    if wire.HDR_CRIT in prot or wire.HDR_CRIT in unprotected:
        raise _Malformed("crit headers unsupported")
    alg = None if wire.HDR_ALG in unprotected else prot.get(wire.HDR_ALG)
    kid = unprotected.get(wire.HDR_KID, prot.get(wire.HDR_KID))
    if kid is not None and not isinstance(kid, bytes):
        raise _Malformed("kid is not a byte string")
    return obj, alg, kid, payload, tag


def _claims_ok(c) -> bool:
    def uint(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def text(v):
        return isinstance(v, str) and len(v) <= wire.MAX_TEXT_CLAIM

    if not isinstance(c, dict) or not text(c.get(wire.CLAIM_AUD)):
        return False
    cti = c.get(wire.CLAIM_CTI)
    if not isinstance(cti, bytes) or not 0 < len(cti) <= wire.MAX_CTI:
        return False
    if any(k in c and not text(c[k]) for k in (wire.CLAIM_ISS, wire.CLAIM_SUB)):
        return False
    if any(k in c and not uint(c[k]) for k in (wire.CLAIM_EXP, wire.CLAIM_NBF, wire.CLAIM_IAT, wire.CLAIM_EXI)):
        return False
    if wire.CLAIM_EXP not in c and wire.CLAIM_EXI not in c:
        return False
    act = c.get(wire.CLAIM_ACTION)
    if not uint(act) or not 0 < act < len(wire.ACTION_NAMES):
        return False
    if c.get(wire.CLAIM_USES, wire.USES_SINGLE) not in (wire.USES_MANY, wire.USES_SINGLE):
        return False
    scope = c.get(wire.CLAIM_SCOPE)
    if scope is not None and not (isinstance(scope, list) and 0 < len(scope) <= wire.MAX_SCOPE and all(uint(i) for i in scope)):
        return False
    limits = c.get(wire.CLAIM_LIMITS)
    if limits is not None and not (isinstance(limits, dict) and all(uint(v) for v in limits.values())):
        return False
    return True


def verify(token: bytes, ctx: CheckContext, action: int | None = None, index: int | None = None) -> Verdict:
    """Check a permit as the board does, returning a Verdict with a reason code."""
    if len(token) > wire.MAX_PERMIT:
        return Verdict(wire.TOO_LARGE)
    try:
        mac0, alg, kid, payload, tag = _split(token)
    except _Malformed:
        return Verdict(wire.MALFORMED)
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in TAG_LEN:
        return Verdict(wire.BAD_ALG, kid=kid)
    if kid is None:
        return Verdict(wire.UNKNOWN_KEY, alg=alg)
    if not ctx.has_key:
        return Verdict(wire.NO_KEY, alg=alg, kid=kid)
    key = ctx.keys.get(kid)
    if key is None:
        return Verdict(wire.UNKNOWN_KEY, alg=alg, kid=kid)
    if len(tag) != TAG_LEN[alg]:
        return Verdict(wire.BAD_MAC, alg=alg, kid=kid)
    try:
        COSE.new().decode(mac0, _cose_key(key, alg, kid))
    except Exception:  # python-cwt raises VerifyError (and ValueError on odd headers)
        return Verdict(wire.BAD_MAC, alg=alg, kid=kid)

    def v(reason, claims=None):
        return Verdict(reason, claims, alg, kid)

    try:
        c = strict_loads(payload, 3)
    except _Malformed:
        return v(wire.MALFORMED)
    if not _claims_ok(c):
        return v(wire.MALFORMED)
    if c[wire.CLAIM_AUD] != ctx.device_id:
        return v(wire.WRONG_AUDIENCE, c)
    cti = c[wire.CLAIM_CTI]
    exp, nbf, exi = c.get(wire.CLAIM_EXP), c.get(wire.CLAIM_NBF), c.get(wire.CLAIM_EXI)
    if exp is not None or nbf is not None:
        if ctx.now is None:
            if exi is None:
                return v(wire.TIME_UNTRUSTED, c)
        else:
            if nbf is not None and ctx.now + ctx.leeway < nbf:
                return v(wire.NOT_YET_VALID, c)
            if exp is not None and ctx.now - ctx.leeway >= exp:
                return v(wire.EXPIRED, c)
    if exi is not None:
        elapsed = ctx.exi_elapsed.get(cti)
        if elapsed is not None and elapsed >= exi:
            return v(wire.EXPIRED, c)
    if cti in ctx.revoked_ctis or c.get(wire.CLAIM_SUB) in ctx.revoked_users:
        return v(wire.REVOKED, c)
    if c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE and cti in ctx.used_ctis:
        return v(wire.REPLAYED, c)
    if action is not None and c[wire.CLAIM_ACTION] != action:
        return v(wire.WRONG_ACTION, c)
    scope = c.get(wire.CLAIM_SCOPE)
    if index is not None and scope is not None and index not in scope:
        return v(wire.OUT_OF_SCOPE, c)
    return v(wire.OK, c)


def describe(claims: dict) -> dict:
    """Claims with readable names, for `permit show` and logs."""
    names = {
        wire.CLAIM_ISS: "iss",
        wire.CLAIM_SUB: "sub",
        wire.CLAIM_AUD: "aud",
        wire.CLAIM_EXP: "exp",
        wire.CLAIM_NBF: "nbf",
        wire.CLAIM_IAT: "iat",
        wire.CLAIM_CTI: "cti",
        wire.CLAIM_EXI: "exi",
        wire.CLAIM_ACTION: "action",
        wire.CLAIM_SCOPE: "scope",
        wire.CLAIM_LIMITS: "limits",
        wire.CLAIM_USES: "uses",
    }
    out = {}
    for k, val in claims.items():
        name = names.get(k, str(k))
        if k == wire.CLAIM_CTI and isinstance(val, bytes):
            val = val.hex()
        elif k == wire.CLAIM_ACTION and isinstance(val, int) and 0 < val < len(wire.ACTION_NAMES):
            val = wire.ACTION_NAMES[val]
        elif k == wire.CLAIM_USES:
            val = "single" if val == wire.USES_SINGLE else "many"
        elif k == wire.CLAIM_LIMITS and isinstance(val, dict):
            val = {{wire.LIMIT_WH: "max_wh", wire.LIMIT_W: "max_w"}.get(lk, str(lk)): lv for lk, lv in val.items()}
        out[name] = val
    return out
