# Runs on MicroPython and CPython: the console presentation protocol with a
# stand-in application that records what it was handed.
from binascii import hexlify

import present
import wire


class App:
    def __init__(self):
        self.tokens = []

    def present(self, token):
        self.tokens.append(hexlify(token).decode())
        if token == b"\x01\x02":
            return wire.OK, "outlet 1"
        return wire.EXPIRED, None


def lines(inputs):
    app = App()
    p = present.Presenter(app)
    return {"answers": [p.line(x) for x in inputs], "tokens": app.tokens}


def decode(text):
    try:
        return hexlify(present.decode(text)).decode()
    except ValueError as e:
        return "ValueError: " + str(e)


class Reader:
    def __init__(self, items):
        self._items = list(items)

    async def readline(self):
        return self._items.pop(0) if self._items else b""


def console(inputs):
    import asyncio

    out = []
    app = App()
    asyncio.run(present.console(present.Presenter(app), Reader([x.encode() for x in inputs]), out.append))
    return out
