# Signed commands (SPEC.md, Messages): a command that changes a board is a
# COSE_Mac0 (tag 17, alg 4 or 5, kid = key version) under the device key
# whose payload is a message envelope. The MAC covers external_aad
# "voltgate/command", so a permit can never pass for a command nor a command
# for a permit, though both use the same key. Freshness (the board's nonce
# for a time sync, a counter for the rest) is checked by the caller, which
# knows what it expects. Runs on MicroPython and CPython.
import wire
from cbor import CBORError, Decoder
from permit import authenticate

AAD = b"voltgate/command"
_ENV_DEPTH = 4  # envelope -> body -> small maps/lists


def verify(token, keys):
    """(reason, envelope): envelope is the decoded map once the MAC is good.

    keys is anything with key(kid) -> HMAC256 / raw key / None (or raising
    NoKey), such as the board's Identity.current()."""
    d = Decoder(token)
    reason, payload = authenticate(token, keys, wire.MAX_FRAME, AAD, d)
    if reason != wire.OK:
        return reason, None
    try:
        d.reset(payload, _ENV_DEPTH)
        env = d.item()
        d.finish()
    except CBORError:
        return wire.MALFORMED, None
    if not isinstance(env, dict) or not isinstance(env.get(wire.ENV_TYPE), int):
        return wire.MALFORMED, None
    return wire.OK, env
