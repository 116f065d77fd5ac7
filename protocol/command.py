# Signed commands (SPEC.md, Messages): a command that changes a board is a
# COSE_Mac0 (tag 17, alg 4 or 5, kid = key version) under the device key
# whose payload is a message envelope. The MAC covers external_aad
# "voltgate/command", so a permit can never pass for a command nor a command
# for a permit, though both use the same key. Freshness (the board's nonce
# for a time sync, a counter for the rest) is checked by the caller, which
# knows what it expects. Runs on MicroPython and CPython.
import wire
from cbor import CBORError, Decoder
from hmac256 import HMAC256, equal_prefix
from permit import NoKey, mac_of, parse

AAD = b"voltgate/command"
_ENV_DEPTH = 4  # envelope -> body -> small maps/lists


def verify(token, keys):
    """(reason, envelope): envelope is the decoded map once the MAC is good.

    keys is anything with key(kid) -> HMAC256 / raw key / None (or raising
    NoKey), such as the board's permit checker."""
    if len(token) > wire.MAX_FRAME:
        return wire.TOO_LARGE, None
    d = Decoder(token)
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
    if key.key_len != 32:
        return wire.NO_KEY, None
    if len(tag) != tag_len or not equal_prefix(mac_of(key, protected, payload, AAD), tag):
        return wire.BAD_MAC, None
    try:
        d.reset(payload, _ENV_DEPTH)
        env = d.item()
        d.finish()
    except CBORError:
        return wire.MALFORMED, None
    if not isinstance(env, dict) or not isinstance(env.get(wire.ENV_TYPE), int):
        return wire.MALFORMED, None
    return wire.OK, env
