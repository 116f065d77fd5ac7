# Runs on MicroPython: firmware/link.py on a simulated outlet board
# (outlet_checks.Board), requests in and replies out as hex, as a transport
# would carry them.
from binascii import hexlify, unhexlify

import link
import outlet_checks

LINKS = {}


def _attach(name):
    b = outlet_checks.BOARDS[name]
    LINKS[name] = link.Link(b.sys, b.app)


def new(name, board_path, root, store, opts):
    got = outlet_checks.new(name, board_path, root, store, opts)
    _attach(name)
    return got


def handle(name, req_hex):
    out = LINKS[name].handle(unhexlify(req_hex))
    return None if out is None else hexlify(out).decode()


def outbox(name):
    lk = LINKS[name]
    out = [hexlify(m).decode() for m in lk.outbox]
    lk.outbox.clear()
    return out


def reboot(name, power_cut):
    got = outlet_checks.reboot(name, power_cut)
    _attach(name)
    return got


def store_ctr(name):
    raw = outlet_checks.BOARDS[name].hw.store.get("cmd_ctr")
    return None if raw is None else int.from_bytes(raw, "big")


def log_stats(name):
    return outlet_checks.BOARDS[name].sys.log.stats()



def oc(name, fn, *args):
    """outlet_checks.fn on this board (the worker runs one module per process)."""
    return getattr(outlet_checks, fn)(name, *args)
