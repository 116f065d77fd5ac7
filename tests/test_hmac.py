"""HMAC-SHA256 on MicroPython's hashlib: RFC 4231 known answers and the stdlib."""

import hashlib
import hmac
import random

import pytest

RFC4231 = [  # (key, data, HMAC-SHA-256) from RFC 4231 section 4
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First", "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize("key,data,expected", RFC4231, ids=["tc1", "tc2", "tc6_long_key", "tc7_long_key_and_data"])
def test_rfc4231(interp, key, data, expected):
    assert interp.call("hmac_checks", "mac", key.hex(), data.hex()) == expected


def test_agrees_with_the_stdlib_on_every_key_length(interp):
    rng = random.Random(4231)
    pairs = [(rng.randbytes(n), rng.randbytes(rng.randrange(0, 300))) for n in list(range(0, 70)) + [127, 128, 129, 200]]
    got = interp.call("hmac_checks", "mac_many", [[k.hex(), m.hex()] for k, m in pairs])
    assert got == [hmac.new(k, m, hashlib.sha256).hexdigest() for k, m in pairs]


def test_equal_prefix(interp):
    full = bytes(range(32)).hex()
    assert interp.call("hmac_checks", "equal_prefix", full, full[:16])
    assert not interp.call("hmac_checks", "equal_prefix", full, "ff" + full[2:16])
    assert not interp.call("hmac_checks", "equal_prefix", full, full[:14] + "ff")
    assert not interp.call("hmac_checks", "equal_prefix", full[:8], full[:16])  # tag longer than the MAC
