"""protocol/vectors/messages.json: the host builds these bytes, and the
board's link (on CPython and on MicroPython) gives each signed command the
verdict the file states, storing the counter only when it accepts."""

import json

import cbor2
import pytest

from voltgate import msgvectors, tree, wire

DATA = json.loads((tree.vectors_dir() / "messages.json").read_text())


def test_the_vectors_file_is_what_the_generator_makes():
    assert msgvectors.main(["--check"]) == 0, "run: .venv/bin/python -m voltgate.msgvectors"


@pytest.mark.parametrize("case", DATA["requests"], ids=lambda c: c["name"])
def test_requests_decode_to_what_the_file_says(case):
    env = cbor2.loads(bytes.fromhex(case["request"]))
    assert wire.json_form(env) == case["decoded"]
    assert isinstance(env[wire.ENV_TYPE], int) and 0 < env[wire.ENV_TYPE] < wire.MSG_REPLY


@pytest.mark.parametrize("case", DATA["commands"], ids=lambda c: c["name"])
def test_the_board_gives_each_command_its_verdict(interp, case):
    reason, stored, logged = interp.call("msg_checks", "verdict", DATA["device"], DATA["key"], DATA["counter"], DATA["floor"], case["request"])
    assert reason == case["reason"], wire.reason_name(reason)
    env = cbor2.loads(bytes.fromhex(case["request"]))
    if case["reason"] == wire.OK:
        assert stored > DATA["counter"]
    else:
        assert stored == DATA["counter"]
    if case["reason"] in (wire.BAD_MAC, wire.MALFORMED):
        assert logged is None  # refused before a valid MAC (or unreadable): counted, not logged
    else:
        assert logged == [env[wire.ENV_TYPE], case["reason"]]
