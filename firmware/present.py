# Local permit presentation: seed 004's offline path. A permit reaches the
# board from a local channel instead of the server: now the console (the
# USB serial line), later BLE or NFC. Every source hands tokens to one
# Presenter, which gives them to the application (app.present, firmware/
# APPS.md) and answers in one line.
#
# Console protocol, one line each way:
#   -> present <token>        token as hex, or base64url (with or without '=')
#   <- ok <detail>            the board acted on it (detail: the app's words)
#   <- refused <reason>       a reason name (protocol/SPEC.md, reason codes)
#   <- error <what>           the line was not a presentation
# Another source (BLE, NFC) calls Presenter.handle(token) with the bytes it
# received and sends the answer back its own way.
import sys
from binascii import a2b_base64, unhexlify

import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_LINE = const(1024)  # a 512-byte permit in base64 is 684 characters
_HEX = "0123456789abcdefABCDEF"
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def decode(text):
    """Token bytes from hex or base64url text; ValueError if neither."""
    text = text.strip()
    if not text:
        raise ValueError("no token")
    if len(text) % 2 == 0 and all(c in _HEX for c in text):
        return unhexlify(text)
    body = text.rstrip("=")
    # a2b_base64 skips characters outside its alphabet: check them first
    if not all(c in _B64URL for c in body) or len(body) % 4 == 1:
        raise ValueError("not hex or base64url")
    b64 = body.replace("-", "+").replace("_", "/")
    return a2b_base64(b64 + "=" * (-len(b64) % 4))


class Presenter:
    def __init__(self, app):
        self._app = app
        self.count = 0

    def handle(self, token):
        """A token from any source: the answer line (without newline)."""
        self.count += 1
        reason, detail = self._app.present(token)
        if reason == wire.OK:
            return "ok " + (detail or "")
        return "refused " + wire.reason_name(reason)

    def line(self, line):
        """A console line: the answer line."""
        if len(line) > MAX_LINE:
            return "error line too long"
        parts = line.strip().split(None, 1)
        if not parts:
            return None  # an empty line: nothing to answer
        if parts[0] != "present" or len(parts) != 2:
            return "error expected: present <hex or base64url token>"
        try:
            token = decode(parts[1])
        except ValueError as e:
            return "error " + str(e)
        return self.handle(token)


async def console(presenter, reader, write=None):
    """Serve the console: reader.readline() is awaitable (an asyncio
    StreamReader on sys.stdin on the board); answers go to write."""
    if write is None:
        write = sys.stdout.write
    while True:
        raw = await reader.readline()
        if not raw:
            return  # the stream closed
        line = raw.decode() if isinstance(raw, bytes) else raw
        answer = presenter.line(line)
        if answer is not None:
            write(answer + "\n")
