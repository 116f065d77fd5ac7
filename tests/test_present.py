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
