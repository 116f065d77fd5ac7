# Runs on MicroPython and CPython: HMAC-SHA256 and the MAC compares.
from binascii import hexlify, unhexlify

import hmac256


def mac(key_hex, msg_hex):
    return hexlify(hmac256.HMAC256(unhexlify(key_hex)).mac(unhexlify(msg_hex))).decode()


def mac_many(pairs):
    return [mac(k, m) for k, m in pairs]


def equal_prefix(full_hex, tag_hex):
    return hmac256.equal_prefix(unhexlify(full_hex), unhexlify(tag_hex))
