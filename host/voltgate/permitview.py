"""Permits for people: reading a token from a file or a string, showing it
(claims, window in local time, verdict with its reason) and a QR code.

    token = read_token("permit.cbor")                # or hex, or base64url text
    view = inspect(token, keys={1: key}, device_id="ou-1")
    view["verdict"]   # {"ok": False, "reason": "expired", "why": "...", "checked": True}

The verdict is the board's own check (voltgate.permits.verify: the same
code as protocol/permit.py) with a trusted clock at `now`, no revocations
and nothing used yet: what a board that knows the key would say to the
permit on its own.
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from . import keys, permits, wire
from .errors import EXIT_USAGE, VoltgateError

WHY = {
    "ok": "the board would accept it",
    "malformed": "not a COSE_Mac0 permit the boards read (structure, types or bounds)",
    "too_large": f"longer than {wire.MAX_PERMIT} bytes",
    "bad_alg": "the protected header does not name HMAC 256/64 or 256/256",
    "no_key": "no key to check it with",
    "unknown_key": "its kid names a key version this key set does not have",
    "bad_mac": "the MAC does not match: made under another key, or altered",
    "wrong_audience": "it is for another device",
    "time_untrusted": "the board's clock is not trusted and the permit has no exi",
    "not_yet_valid": "its window has not begun",
    "expired": "its window has ended",
    "revoked": "it (or its user) is revoked",
    "replayed": "a single-use permit already used",
    "wrong_action": "it does not allow this action",
    "out_of_scope": "the slot or outlet is outside its scope",
}


def read_token(arg: str) -> bytes:
    """A permit from a file (CBOR bytes, or hex / base64url text in it) or
    from the argument itself (hex or base64url, or `present <token>`)."""
    p = Path(arg)
    try:
        is_file = len(arg) < 4096 and p.is_file()
    except OSError:
        is_file = False
    if is_file:
        data = p.read_bytes()
        if data[:1] in (b"\xd1", b"\xd8", b"\x84"):  # tag 17, tag 61, or a bare 4-array
            return data
        try:
            return decode_text(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise VoltgateError(f"{arg} holds neither a CBOR permit nor hex or base64url text", None, EXIT_USAGE) from None
    try:
        return decode_text(arg)
    except ValueError:
        hint = "give a file written by `permit issue --out`, or the token text"
        raise VoltgateError(f"{arg[:40]!r} is not a permit file, nor hex or base64url", hint, EXIT_USAGE) from None


def decode_text(text: str) -> bytes:
    text = text.strip()
    if text.startswith("present "):
        text = text[len("present ") :].strip()
    if not text:
        raise ValueError("empty")
    try:
        if len(text) % 2 == 0:
            return bytes.fromhex(text)
    except ValueError:
        pass
    body = text.rstrip("=")
    if not body or not all(c.isalnum() or c in "-_" for c in body) or len(body) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


def b64url(token: bytes) -> str:
    return base64.urlsafe_b64encode(token).rstrip(b"=").decode()


def local(t: int | None, tz: str | None = None) -> str | None:
    if t is None:
        return None
    zone = ZoneInfo(tz) if tz else None
    return datetime.fromtimestamp(t, zone).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def inspect(
    token: bytes,
    *,
    keys_by_version: dict[int, bytes] | None = None,
    device_id: str | None = None,
    now: int | None = None,
    tz: str | None = None,
    action: str | None = None,
    index: int | None = None,
) -> dict:
    """Everything a technician wants to know about a permit. Without keys
    the MAC is not checked and the verdict says so."""
    claims = permits.claims_of(token)
    alg, kid, *_ = permits._board.permit.parse(bytes(token))
    d = permits.describe(claims)
    version = keys.version_of(kid) if isinstance(kid, bytes) else None
    now = int(time.time()) if now is None else int(now)
    out = {
        "bytes": len(token),
        "alg": permits.ALG_NAMES.get(alg, f"unknown ({alg})"),
        "kid": kid.hex() if isinstance(kid, bytes) else None,
        "key_version": version,
        "claims": _jsonable(d),
        "window": {
            "not_before": local(d.get("nbf"), tz),
            "expires": local(d.get("exp"), tz),
            "issued": local(d.get("iat"), tz),
            "exi_s": d.get("exi"),
        },
        "b64url": b64url(token),
    }
    if keys_by_version is None:
        out["verdict"] = {"ok": None, "reason": None, "why": "MAC not checked: give the keystore to verify it", "checked": False}
        return out
    ctx = permits.CheckContext(device_id=device_id or d.get("aud") or "", keys={keys.kid_for(v): k for v, k in keys_by_version.items()}, now=now)
    code = None
    if action is not None:
        if action not in wire.ACTION_CODES:
            raise VoltgateError(f"unknown action {action!r}", "one of " + ", ".join(wire.ACTION_CODES), EXIT_USAGE)
        code = wire.ACTION_CODES[action]
    v = permits.verify(token, ctx, code, index)
    why = WHY.get(v.reason_name, v.reason_name)
    out["verdict"] = {"ok": v.ok, "reason": v.reason_name, "why": why, "checked": True, "at": local(now, tz), "device": ctx.device_id}
    return out


def _jsonable(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def qr_png(token: bytes, path: str | Path, *, box_size: int = 8) -> str:
    """A QR code (PNG) of the permit as base64url text, what a phone shows
    and a reader (or `present <text>` on the console) takes. Returns the text."""
    import qrcode

    text = b64url(token)
    img = qrcode.make(text, box_size=box_size, border=4, error_correction=qrcode.constants.ERROR_CORRECT_M)
    img.save(str(path))
    return text
