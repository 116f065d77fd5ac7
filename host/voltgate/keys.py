"""Device keys: derived from the master secret, versioned through the kid.

device key = HMAC-SHA256(master, "voltgate/device/v1/" + device_id + "/" + version)

The "v1" names this derivation scheme; the key version (1, 2, ...) rotates
one device's key without touching the master. A board holds only its own
key, so a cloned board cannot forge permits for any other board.
"""

import hashlib
import hmac
import os
import re

from .errors import EXIT_USAGE, VoltgateError

LABEL = b"voltgate/device/v1/"
KEY_LEN = 32
MAX_KEY_VERSION = 0xFFFF
# Device ids appear in MQTT topics and file names: no '/', '+', '#', spaces.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise VoltgateError(
            f"invalid device id {device_id!r}",
            "1-32 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
            EXIT_USAGE,
        )
    return device_id


def check_key_version(version: int) -> int:
    if not isinstance(version, int) or not 1 <= version <= MAX_KEY_VERSION:
        raise VoltgateError(f"invalid key version {version!r}", f"1..{MAX_KEY_VERSION}", EXIT_USAGE)
    return version


def derive_device_key(master: bytes, device_id: str, version: int) -> bytes:
    if len(master) < 32:
        raise VoltgateError("master secret shorter than 32 bytes", "generate a new keystore", EXIT_USAGE)
    check_device_id(device_id)
    check_key_version(version)
    msg = LABEL + device_id.encode() + b"/" + str(version).encode()
    return hmac.new(master, msg, hashlib.sha256).digest()


MQTT_LABEL = b"voltgate/mqtt/v1"


def mqtt_password(device_key: bytes) -> str:
    """A board's broker password: derived from its device key (the board
    computes the same in firmware/mqtt.py), so provisioning stores no second
    secret and the server can write the broker's password file from the
    master secret alone. 32 hex digits (128 bits)."""
    return hmac.new(device_key, MQTT_LABEL, hashlib.sha256).digest()[:16].hex()


def kid_for(version: int) -> bytes:
    """The kid of a key version: the version as a minimal big-endian byte string."""
    check_key_version(version)
    return version.to_bytes((version.bit_length() + 7) // 8, "big")


def version_of(kid: bytes) -> int | None:
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= 2 or kid[0] == 0:
        return None
    return int.from_bytes(kid, "big")


def create_master(path) -> bytes:
    """Write a new random 32-byte master secret to path, readable by its owner only.

    Refuses to overwrite: losing a master secret orphans every board keyed from it."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VoltgateError(f"{path} exists already", "use it, or move it away first", EXIT_USAGE) from None
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


def load_master(path) -> bytes:
    from pathlib import Path

    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise VoltgateError(f"no master secret at {path}", "create one with provisioning", EXIT_USAGE) from None
    if st.st_mode & 0o077:
        raise VoltgateError(f"{path} is readable by others", f"chmod 600 {path}", EXIT_USAGE)
    if len(data) != 32:
        raise VoltgateError(f"{path} does not hold a 32-byte master secret", None, EXIT_USAGE)
    return data
