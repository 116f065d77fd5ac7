"""Local permit presentation (seed 004's offline path): the console protocol
on both interpreters, and a real permit presented to a real application is
covered by the station and outlet scenario tests."""

import base64

import pytest


def test_hex_and_base64url_decode_alike(interp):
    token = bytes(range(40))
    b64 = base64.urlsafe_b64encode(token).decode()
    assert interp.call("present_checks", "decode", token.hex()) == token.hex()
    assert interp.call("present_checks", "decode", token.hex().upper()) == token.hex()
    assert interp.call("present_checks", "decode", b64) == token.hex()
    assert interp.call("present_checks", "decode", b64.rstrip("=")) == token.hex()
    assert interp.call("present_checks", "decode", "  " + b64 + "\r\n") == token.hex()


@pytest.mark.parametrize("bad", ["", "   ", "not a token!", "@@@@", "AQIDB"])
def test_bad_tokens_are_refused_with_a_value_error(interp, bad):
    assert interp.call("present_checks", "decode", bad).startswith("ValueError")


def test_console_lines(interp):
    got = interp.call(
        "present_checks",
        "lines",
        ["present 0102", "present AQI", "present 0103", "", "hello", "present", "present !!", "present " + "a" * 2000],
    )
    assert got["answers"] == [
        "ok outlet 1",
        "ok outlet 1",  # the same token in base64url
        "refused expired",
        None,
        "error expected: present <hex or base64url token>",
        "error expected: present <hex or base64url token>",
        "error not hex or base64url",
        "error line too long",
    ]
    assert got["tokens"] == ["0102", "0102", "0103"]


def test_console_task_answers_each_line_until_the_stream_closes(mp_worker):
    assert mp_worker.call("present_checks", "console", ["present 0102\n", "\n", "present 0103\n"]) == ["ok outlet 1\n", "refused expired\n"]


CONSOLE_BOARD = r"""
import json, sys
from binascii import unhexlify
import link, main, serlink, wire
from hal import sim
from outlet import Outlet
from vgemit import emit

with open(sys.argv[1]) as f:
    spec = json.load(f)
with open(spec["board"]) as f:
    board = json.load(f)
world = sim.World(board)
hw = sim.make(board, spec["root"], world)
hw.store.provision(spec["store"])
world.outlets[0].load_w = 1000
apps = []

def make(p):
    apps.append(Outlet(p))
    return apps[0]

async def drive(p, sup):
    await sim.drive(world, 20000, 50)  # the console reads stdin meanwhile

main.run(hw, board, (make, lambda p: serlink.Console(link.Link(p, apps[0]))), extra=drive)
emit({"relay": world.outlets[0].relay_on, "pulses": hw.outlets[0].meter.pulses()})
"""


def test_a_permit_typed_on_the_console_switches_the_real_outlet_on(mp, tmp_path):
    """Seed 004's offline path end to end: the console task (serlink), the
    presenter and the outlet app, from .mpy, with the permit on stdin."""
    import json as _json

    from voltgate import keys, permits, tree

    dev = "out-console"
    key = keys.derive_device_key(bytes(32), dev, 1)
    store = {"dev_id": dev.encode().hex(), "key": key.hex(), "key_ver": 1}
    spec = tmp_path / "spec.json"
    spec.write_text(_json.dumps({"board": str(tree.boards_dir() / "sim-outlet-2.json"), "root": str(tmp_path / "fs"), "store": store}))
    # the clock is not trusted at boot: an exi permit is what works offline
    tok = permits.issue(key, 1, device_id=dev, user_id="walk-up", action="power", expires=2_000_000_000, exi=3600, scope=[0])
    lines = "hello\npresent " + base64.urlsafe_b64encode(tok).decode().rstrip("=") + "\npresent " + tok.hex() + "\n"
    res = mp.run(code=CONSOLE_BOARD, args=[spec], compiled=True, stdin=lines)
    console = res.stdout.splitlines()
    assert "error expected: present <hex or base64url token>" in console
    assert "ok outlet 0" in console
    assert "refused replayed" in console  # the same single-use permit, as hex
    assert res.record["relay"] is True and res.record["pulses"] > 0
