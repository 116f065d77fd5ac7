"""voltgate build: wire constants folded into the board's modules."""

import re

from voltgate import build, tree, wire


def test_fold_replaces_integer_constants_only_and_keeps_lines():
    consts = build.wire_constants()
    src = "a = wire.BAD_MAC\nb = wire.reason_name(a)  # wire.OK\nc = wire.REASON_NAMES\nd = wire.CLAIM_ACTION\n"
    out = build.fold_wire(src, consts)
    assert out.splitlines() == ["a = 6", "b = wire.reason_name(a)  # 0", "c = wire.REASON_NAMES", "d = -65537"]


def test_strip_keeps_the_line_count_and_the_runtime_parts():
    text = (tree.protocol_dir() / "wire.py").read_text()
    out = build.strip_wire(text)
    assert len(out.splitlines()) == len(text.splitlines())  # tracebacks keep their lines
    assert "BAD_MAC = const(6)" not in out and "# BAD_MAC = 6 (folded into the modules)" in out
    assert "REASON_NAMES = (" in out and "def json_form(v):" in out


def test_no_board_module_is_left_reading_an_integer_from_wire():
    consts = build.wire_constants()
    for src, rel in build._sources():
        if rel == "wire.py":
            continue
        folded = build.fold_wire(src.read_text(), consts)
        left = {m for m in re.findall(r"\bwire\.([A-Z][A-Z0-9_]*)", folded)}
        assert left <= {"REASON_NAMES", "ACTION_NAMES"}, (rel, left)


def test_the_built_wire_module_has_no_integer_names(mp, firmware_build):
    code = "import wire\nfrom vgemit import emit\nemit([hasattr(wire, 'BAD_MAC'), wire.reason_name(6), len(wire.REASON_NAMES)])\n"
    assert mp.run(code=code, compiled=True).record == [False, "bad_mac", len(wire.REASON_NAMES)]
