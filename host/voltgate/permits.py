"""Permits on the host: issue with python-cwt, decode, and verify.

A permit is a CWT in a COSE_Mac0 (protocol/SPEC.md, Permits). Issuing and
MAC checking go through python-cwt's COSE layer; the claim checks below run
in the same order and give the same reason codes as the board's
protocol/permit.py, and the shared vectors hold both to that.
"""

from __future__ import annotations

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
    battery: bytes | None = None,
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
    if expires is None:
        raise VoltgateError("a permit needs an end", "give an expiry time (exi can only shorten it)", EXIT_USAGE)
    if expires is not None and not_before is not None and expires <= not_before:
        raise VoltgateError("the permit window is empty", "expiry must be after not-before", EXIT_USAGE)
    if scope is not None and not 0 < len(scope) <= wire.MAX_SCOPE:
        raise VoltgateError(f"scope must list 1..{wire.MAX_SCOPE} indexes", None, EXIT_USAGE)
    if exi is not None and exi <= 0:
        raise VoltgateError("exi must be a positive number of seconds", None, EXIT_USAGE)
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
    if battery is not None:
        c[wire.CLAIM_BATTERY] = bytes(battery)
    c[wire.CLAIM_USES] = wire.USES_SINGLE if single_use else wire.USES_MANY
    if not _board.permit.claims_ok(c):
        raise VoltgateError(
            "boards would refuse these claims as malformed",
            f"ids and texts at most {wire.MAX_TEXT_CLAIM} bytes, cti 1-{wire.MAX_CTI} bytes, scope 1-{wire.MAX_SCOPE} indexes >= 0, limits whole numbers >= 0",
            EXIT_USAGE,
        )
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
    floor: int | None = None  # lower bound on real time; None: now, or 0 when untrusted
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


_board = tree.board_modules()
# verdicts given before the MAC is checked: python-cwt has nothing to add
_BEFORE_MAC = {wire.TOO_LARGE, wire.BAD_ALG, wire.NO_KEY, wire.UNKNOWN_KEY, wire.BAD_MAC}


class _Env:
    """A CheckContext in the shape protocol/permit.py expects of a board."""

    def __init__(self, ctx: CheckContext):
        self._c = ctx
        self.device_id = ctx.device_id
        self.leeway = ctx.leeway

    def key(self, kid):
        if not self._c.has_key:
            raise _board.permit.NoKey()
        return self._c.keys.get(kid)

    def now(self):
        return self._c.now

    def floor(self):
        return self._c.floor if self._c.floor is not None else (self._c.now or 0)

    def revoked(self, cti, sub):
        return cti in self._c.revoked_ctis or sub in self._c.revoked_users

    def used(self, cti):
        return cti in self._c.used_ctis

    def exi_elapsed(self, cti):
        return self._c.exi_elapsed.get(cti)


def _cwt_mac_ok(token: bytes, key: bytes, alg: int, kid: bytes) -> bool:
    try:
        obj = cbor2.loads(token)
        if isinstance(obj, cbor2.CBORTag) and obj.tag == wire.TAG_CWT:
            obj = obj.value
        COSE.new().decode(obj, _cose_key(key, alg, kid))
        return True
    except Exception:  # python-cwt raises VerifyError, ValueError, DecodeError...
        return False


def verify(token: bytes, ctx: CheckContext, action: int | None = None, index: int | None = None) -> Verdict:
    """Check a permit exactly as a board does, then check its MAC again with
    python-cwt (an independent COSE implementation); if the two disagree on
    the MAC the verdict is bad_mac.

    The claim checks are the board's own code (protocol/permit.py, run here
    on CPython), so host and board cannot give different verdicts for the
    same token and context."""
    reason, claims = _board.permit.verify(bytes(token), _Env(ctx), action, index)
    try:
        alg, kid, *_ = _board.permit.parse(bytes(token))
    except _board.cbor.CBORError:
        alg = kid = None
    if reason not in _BEFORE_MAC and not (reason == wire.MALFORMED and alg is None):
        key = ctx.keys.get(kid) if ctx.has_key else None
        if key is not None and alg in ALG_NAMES and not _cwt_mac_ok(bytes(token), key, alg, kid):
            return Verdict(wire.BAD_MAC, None, alg, kid)
    return Verdict(reason, claims, alg, kid)


def claims_of(token: bytes) -> dict:
    """The claims of a permit, NOT verified: for display only."""
    try:
        _, _, _, payload, _ = _board.permit.parse(bytes(token))
        claims = _board.cbor.loads(payload)
    except _board.cbor.CBORError as e:
        raise VoltgateError(f"not a permit: {e}", "expected a COSE_Mac0 (tag 17) CBOR token", EXIT_USAGE) from None
    if not isinstance(claims, dict):
        raise VoltgateError("not a permit: the payload is not a claims map", None, EXIT_USAGE)
    return claims


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
        wire.CLAIM_BATTERY: "battery",
    }
    out = {}
    for k, val in claims.items():
        name = names.get(k, str(k))
        if k in (wire.CLAIM_CTI, wire.CLAIM_BATTERY) and isinstance(val, bytes):
            val = val.hex()
        elif k == wire.CLAIM_ACTION and isinstance(val, int) and 0 < val < len(wire.ACTION_NAMES):
            val = wire.ACTION_NAMES[val]
        elif k == wire.CLAIM_USES:
            val = "single" if val == wire.USES_SINGLE else "many"
        elif k == wire.CLAIM_LIMITS and isinstance(val, dict):
            val = {{wire.LIMIT_WH: "max_wh", wire.LIMIT_W: "max_w"}.get(lk, str(lk)): lv for lk, lv in val.items()}
        out[name] = val
    return out
