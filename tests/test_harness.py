"""The MicroPython harness itself: results come back, failures are readable."""

import pytest

from voltgate.mpy import MicroPythonError


def test_interp_runs_on_the_named_interpreter(interp):
    assert interp.call("harness_checks", "implementation") == interp.name


def test_values_round_trip(interp):
    value = {"a": [1, -2, 2**64 - 1, "é"], "b": None}
    assert interp.call("harness_checks", "echo", value) == value


def test_exception_inside_micropython_carries_its_traceback(mp_worker):
    with pytest.raises(MicroPythonError) as info:
        mp_worker.call("harness_checks", "fail", "boom-42")
    text = str(info.value)
    assert info.value.exc_type == "ValueError"
    assert "boom-42" in text and "harness_checks.py" in text and "Traceback" in text


def test_one_shot_run_emits_records(mp):
    res = mp.run(code="from vgemit import emit\nimport sys\nemit({'impl': sys.implementation.name, 'n': 3})\n")
    assert res.record == {"impl": "micropython", "n": 3}


def test_failing_script_raises_with_micropython_traceback(mp):
    with pytest.raises(MicroPythonError) as info:
        mp.run(code="def f():\n    raise OSError(5)\nf()\n")
    assert "OSError" in str(info.value) and "line 2" in str(info.value)


def test_heapsize_limit_is_enforced(mp):
    code = "buf = bytearray(80 * 1024)\nprint('allocated')\n"
    assert mp.run(code=code, heapsize=256 * 1024).returncode == 0
    with pytest.raises(MicroPythonError) as info:
        mp.run(code=code, heapsize=64 * 1024)
    assert "MemoryError" in str(info.value) and "heapsize=65536" in str(info.value)


# a record that fits the heap as a list but not as JSON text: the heap is
# filled until ~1 KB is left, then the ~13 KB line is built
FULL_HEAP_EMIT = """
import gc
from vgemit import emit
big = ["x" * 40 for _ in range(300)]
pad = []
gc.collect()
try:
    while True:
        pad.append(bytearray(512))
except MemoryError:
    pass
pad.pop()
pad.pop()
emit(big)
"""


def test_a_record_the_heap_cannot_hold_leaves_no_half_record(mp):
    """A run at the edge of its heap (the benchmarks look for the smallest
    heap a board runs in) may fail while it reports: the result then says
    it failed, with no record, rather than a half-written line that breaks
    the runner. And a half record some script does write is kept as text."""
    res = mp.run(code=FULL_HEAP_EMIT, heapsize=64 * 1024, check=False)
    out = res.stderr + res.stdout
    assert res.returncode != 0 and res.records == [] and "MemoryError" in out and "emit" in out
    assert "\x1e" not in res.stdout
    res = mp.run(code="import sys\nsys.stdout.write('\\x1e{\"a\": 1')\nraise SystemExit(3)\n", check=False)
    assert res.returncode == 3 and res.records == [] and '{"a": 1' in res.stdout


def test_compiled_tree_holds_only_mpy(firmware_build):
    files = [p for p in firmware_build.rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".mpy" for p in files)
    names = {p.relative_to(firmware_build).as_posix() for p in files}
    assert {"cbor.mpy", "permit.mpy", "framing.mpy", "wire.mpy", "hmac256.mpy", "lib/umqtt/simple.mpy"} <= names


def test_compiled_modules_load_on_micropython(mp):
    res = mp.run(code="import cbor, permit, framing\nfrom vgemit import emit\nemit(cbor.__file__)\n", compiled=True)
    assert res.record.endswith("cbor.mpy")


def test_worker_survives_a_flood_of_stderr(mp_worker):
    # more than a pipe buffer (64 KB): a worker whose stderr is not drained would block
    assert mp_worker.call("harness_checks", "noisy", 300_000) == 300_000
    assert mp_worker.call("harness_checks", "echo", 1) == 1


def test_text_beyond_the_bmp_round_trips(interp):
    assert interp.call("harness_checks", "echo", "U+1F600 😀 and é") == "U+1F600 😀 and é"


def test_console_output_during_a_call_is_kept_apart(_mp_workers, mp_worker):
    assert mp_worker.call("harness_checks", "chatty", 500) == 500
    worker = _mp_workers["harness_checks"]
    assert worker.console[0] == "console line 0" and len(worker.console) == 500
    assert mp_worker.call("harness_checks", "echo", [1]) == [1]


def test_a_reply_too_big_for_the_heap_comes_back_as_a_readable_error():
    from conftest import MP_TESTS
    from voltgate import mpy

    with mpy.Worker("harness_checks", path=mpy.source_path(MP_TESTS), heapsize=64 * 1024) as w:
        with pytest.raises(MicroPythonError) as info:
            w.call("huge", 2000)
        assert info.value.exc_type == "MemoryError"
        assert w.call("echo", 5) == 5  # and the worker still answers
