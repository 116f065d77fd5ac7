"""Signed commands to boards (SPEC.md, Messages): a COSE_Mac0 under the
device key over a message envelope, with external_aad "voltgate/command"
(protocol/command.py checks them on the board)."""

from __future__ import annotations

import cbor2
from cwt import COSE

from . import keys, tree, wire
from .permits import ALG_NAMES, _cose_key

AAD = tree.board_modules().command.AAD


def sign(envelope: dict, key: bytes, key_version: int, alg: int = wire.ALG_HMAC256_256) -> bytes:
    kid = keys.kid_for(key_version)
    if alg not in ALG_NAMES:
        raise ValueError(f"unsupported alg {alg}")
    return COSE.new().encode_and_mac(
        cbor2.dumps(envelope), _cose_key(key, alg, kid), protected={wire.HDR_ALG: alg}, unprotected={wire.HDR_KID: kid}, external_aad=AAD
    )


def time_sync(now: int, nonce: bytes, key: bytes, key_version: int) -> bytes:
    """The server's answer to a board's time-sync nonce."""
    return sign({wire.ENV_TYPE: wire.MSG_TIME_SYNC, wire.ENV_NONCE: nonce, wire.ENV_BODY: int(now)}, key, key_version)
