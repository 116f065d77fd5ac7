# Permit verification on the board: a CWT (RFC 8392) in a COSE_Mac0
# (RFC 9052, tag 17, optionally inside the CWT tag 61), alg 5 (HMAC 256/256)
# or 4 (HMAC 256/64). Runs on MicroPython and CPython.
#
# verify() returns (reason, claims). reason is a wire.* code; claims is the
# decoded claims map once the MAC has been checked (so a caller can log who
# presented an expired permit, or take iat into its time floor), else None.
# The checks run in this order and stop at the first failure:
#   1 size and structure        too_large, malformed
#   2 alg in protected header   bad_alg
#   3 key for kid               no_key (board has no key), unknown_key
#   4 MAC, constant time        bad_mac
#   5 claim types               malformed
#   6 aud == this device        wrong_audience
#   7 time window / exi         expired, time_untrusted, not_yet_valid
#   8 revocation                revoked
#   9 replay of single use      replayed
#  10 action, then scope        wrong_action, out_of_scope
# The key has to be chosen (step 3) before the MAC can be checked; kid is
# unauthenticated, so answering unknown_key before bad_mac tells an attacker
# nothing the token did not already say.
#
# env is what the platform plugs in (firmware/permits.py does; tests pass
# fakes). It must have:
#   env.device_id             str, this board's id
#   env.key(kid)              an HMAC256 (or raw 32-byte key) for kid, or None;
#                             a raw key of another length counts as no key;
#                             it may raise NoKey when the board has no key at all
#   env.now()                 trusted Unix time (int) or None while untrusted
#   env.floor()               a lower bound on the real Unix time, always known
#                             (the time floor; equals now() when trusted)
#   env.leeway                seconds of clock skew tolerated on nbf/exp
#   env.revoked(cti, sub)     True if the permit or its user is revoked
#   env.used(cti)             True if this single-use permit was already used
#   env.exi_elapsed(cti)      seconds since this exi permit was first used,
#                             or None if it never was
# verify() itself changes nothing: marking a permit used, starting its exi
# timer and raising the time floor are the caller's, once it acts on it.
import wire
from cbor import CBORError, Decoder
from hmac256 import HMAC256, equal_prefix

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_MAJ_BYTES = const(2)
_MAJ_ARRAY = const(4)
_MAJ_MAP = const(5)
_MAJ_TAG = const(6)
_HDR_DEPTH = const(2)  # header maps hold scalars only
_CLAIMS_DEPTH = const(3)  # claims -> limits map -> values
_MAC0_PREFIX = b"\x84\x64MAC0"  # array(4), "MAC0"
_EMPTY_AAD = b"\x40"
_KEY_LEN = const(32)


class NoKey(Exception):
    """Raised by env.key() when the board has no key provisioned."""


def _uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v):
    # bytes, as CBOR and the CDDL count them (len() of a str counts characters)
    return isinstance(v, str) and (len(v) <= wire.MAX_TEXT_CLAIM // 4 or len(v.encode()) <= wire.MAX_TEXT_CLAIM)


def parse(token, d=None):
    """Split a token into (alg, kid, protected, payload, tag).

    protected, payload and tag are memoryview slices of token. Raises
    CBORError on any structural problem. d is a Decoder to reuse."""
    if d is None:
        d = Decoder(token)
    else:
        d.reset(token)
    n = d._head()
    if d.major == _MAJ_TAG and n == wire.TAG_CWT:
        n = d._head()
    if d.major != _MAJ_TAG or n != wire.TAG_MAC0:
        raise CBORError("not a COSE_Mac0 (tag 17)")
    if d._head() != 4 or d.major != _MAJ_ARRAY:
        raise CBORError("COSE_Mac0 is not an array of 4")
    protected = _bstr(d)
    unprotected = d.item(_HDR_DEPTH)
    payload = _bstr(d)
    tag = _bstr(d)
    d.finish()
    prot = {}
    if len(protected):
        d.reset(protected, _HDR_DEPTH)
        prot = d.item()
        d.finish()
    if not isinstance(prot, dict) or not isinstance(unprotected, dict):
        raise CBORError("header is not a map")
    if wire.HDR_CRIT in prot or wire.HDR_CRIT in unprotected:
        raise CBORError("critical header parameters are not supported")
    for k in prot:
        if k in unprotected:  # RFC 9052 section 3: a label in one bucket only
            raise CBORError("header label in both buckets")
    # alg only counts when protected: alg in the unprotected bucket is the
    # downgrade RFC 9052 forbids. An integer, not 5.0 (which == 5).
    alg = prot.get(wire.HDR_ALG)
    if wire.HDR_ALG in unprotected or not _uint(alg):
        alg = None
    kid = unprotected.get(wire.HDR_KID, prot.get(wire.HDR_KID))
    if kid is not None and not isinstance(kid, bytes):
        raise CBORError("kid is not a byte string")
    return alg, kid, protected, payload, tag


def _bstr(d):
    n = d._head()
    if d.major != _MAJ_BYTES:
        raise CBORError("COSE_Mac0 member is not a byte string")
    return d.take(n)


_HD = bytearray(9)  # scratch for one CBOR head


def _bstr_head(n):
    # the head of a byte string of length n, in _HD (n <= MAX_PERMIT)
    if n < 24:
        _HD[0] = 0x40 | n
        return memoryview(_HD)[:1]
    if n < 256:
        _HD[0] = 0x58
        _HD[1] = n
        return memoryview(_HD)[:2]
    _HD[0] = 0x59
    _HD[1] = n >> 8
    _HD[2] = n & 0xFF
    return memoryview(_HD)[:3]


def mac_of(key, protected, payload, aad=None):
    """HMAC-SHA256 over the COSE MAC_structure
    ["MAC0", protected, external_aad, payload], fed piece by piece.
    Permits use an empty external_aad; signed commands their own label."""
    h = key.inner()
    h.update(_MAC0_PREFIX)
    h.update(_bstr_head(len(protected)))
    h.update(protected)
    if aad is None:
        h.update(_EMPTY_AAD)
    else:
        h.update(_bstr_head(len(aad)))
        h.update(aad)
    h.update(_bstr_head(len(payload)))
    h.update(payload)
    return key.finish(h)


def _opt(c, k, check):
    return k not in c or check(c[k])


def claims_ok(c):
    if not isinstance(c, dict):
        return False
    if not _text(c.get(wire.CLAIM_AUD)):
        return False
    cti = c.get(wire.CLAIM_CTI)
    if not isinstance(cti, bytes) or not 0 < len(cti) <= wire.MAX_CTI:
        return False
    # (no loops over tuples of wire.* here: those tuples are built per call)
    if not _opt(c, wire.CLAIM_ISS, _text) or not _opt(c, wire.CLAIM_SUB, _text):
        return False
    if not _opt(c, wire.CLAIM_EXP, _uint) or not _opt(c, wire.CLAIM_NBF, _uint):
        return False
    if not _opt(c, wire.CLAIM_IAT, _uint) or not _opt(c, wire.CLAIM_EXI, _uint):
        return False
    if wire.CLAIM_EXP not in c:
        return False  # every permit ends: exi only ever shortens it
    act = c.get(wire.CLAIM_ACTION)
    if not _uint(act) or not 0 < act < len(wire.ACTION_NAMES):
        return False
    uses = c.get(wire.CLAIM_USES, wire.USES_SINGLE)
    if not _uint(uses) or uses > wire.USES_SINGLE:
        return False
    scope = c.get(wire.CLAIM_SCOPE)
    if scope is not None:
        if not isinstance(scope, list) or not 0 < len(scope) <= wire.MAX_SCOPE:
            return False
        for i in scope:
            if not _uint(i):
                return False
    bat = c.get(wire.CLAIM_BATTERY)
    if bat is not None and (not isinstance(bat, bytes) or not 0 < len(bat) <= wire.MAX_BATTERY_ID):
        return False
    limits = c.get(wire.CLAIM_LIMITS)
    if limits is not None:
        if not isinstance(limits, dict):
            return False
        for k in limits:
            if not _uint(limits[k]):
                return False
    return True


_dec = None


def _decoder():
    # verify() never yields, so one module-level decoder serves every call
    global _dec
    if _dec is None:
        _dec = Decoder(b"")
    return _dec


def authenticate(token, keys, max_len, aad, d):
    """Steps 1-5, shared with signed commands (command.py): size, structure,
    alg, key, MAC. Returns (reason, payload) with payload a memoryview of
    the MACed bytes when reason is OK. d: the Decoder to use."""
    if len(token) > max_len:
        return wire.TOO_LARGE, None
    try:
        alg, kid, protected, payload, tag = parse(token, d)
    except CBORError:
        return wire.MALFORMED, None
    if alg == wire.ALG_HMAC256_256:
        tag_len = 32
    elif alg == wire.ALG_HMAC256_64:
        tag_len = 8
    else:
        return wire.BAD_ALG, None
    try:
        key = keys.key(kid) if kid is not None else None
    except NoKey:
        return wire.NO_KEY, None
    if key is None:
        return wire.UNKNOWN_KEY, None
    if not isinstance(key, HMAC256):
        key = HMAC256(key)
    if key.key_len != _KEY_LEN:
        return wire.NO_KEY, None  # a key of another length is no key: fail closed
    if len(tag) != tag_len or not equal_prefix(mac_of(key, protected, payload, aad), tag):
        return wire.BAD_MAC, None
    return wire.OK, payload


def verify(token, env, action, index=None):
    """action: the action the caller is about to take (None only in tools
    that inspect a permit without acting on it); index: the slot or outlet
    it acts on, checked against the scope (None: the caller picks within the
    scope itself)."""
    d = _decoder()  # one decoder for the token, its headers and its claims
    reason, payload = authenticate(token, env, wire.MAX_PERMIT, None, d)
    if reason != wire.OK:
        return reason, None
    try:
        d.reset(payload, _CLAIMS_DEPTH)
        c = d.item()
        d.finish()
    except CBORError:
        return wire.MALFORMED, None
    if not claims_ok(c):
        return wire.MALFORMED, None
    if c[wire.CLAIM_AUD] != env.device_id:
        return wire.WRONG_AUDIENCE, c

    cti = c[wire.CLAIM_CTI]
    exp = c.get(wire.CLAIM_EXP)
    nbf = c.get(wire.CLAIM_NBF)
    exi = c.get(wire.CLAIM_EXI)
    # past exp is decidable from the floor alone: real time is at least the floor
    if exp is not None and env.floor() - env.leeway >= exp:
        return wire.EXPIRED, c
    now = env.now()
    if exp is not None or nbf is not None:
        if now is None:
            if exi is None:
                return wire.TIME_UNTRUSTED, c
        else:
            lee = env.leeway
            if nbf is not None and now + lee < nbf:
                return wire.NOT_YET_VALID, c
            if exp is not None and now - lee >= exp:
                return wire.EXPIRED, c
    if exi is not None:
        elapsed = env.exi_elapsed(cti)
        if elapsed is not None and elapsed >= exi:
            return wire.EXPIRED, c

    if env.revoked(cti, c.get(wire.CLAIM_SUB)):
        return wire.REVOKED, c
    if c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE and env.used(cti):
        return wire.REPLAYED, c
    if action is not None and c[wire.CLAIM_ACTION] != action:
        return wire.WRONG_ACTION, c
    if index is not None:
        scope = c.get(wire.CLAIM_SCOPE)
        if scope is not None and index not in scope:
            return wire.OUT_OF_SCOPE, c
    return wire.OK, c
