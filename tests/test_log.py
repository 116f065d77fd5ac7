"""The board's flash log (firmware/log.py, SPEC.md section 6) on the real MicroPython.

Records written by the checks (tests/mp/log_checks.py) carry contents that
follow from their seq, so a survey after any crash can tell intact records
from damaged ones. The file format is read back here by a parser written
from SPEC.md, not from log.py.

Power cuts are simulated three ways: a MicroPython process appending in a
loop is killed with SIGKILL after a random number of confirmed appends;
the tail of a finished log is truncated or has bytes flipped; and a crash
is injected before each file system step (open, write, flush, rename,
remove; a crash at a write leaves half of it) while appends thin a full log.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import tempfile
from binascii import crc32
from pathlib import Path

import pytest

from voltgate import build, mpy, wire

MP_TESTS = Path(__file__).resolve().parent / "mp"
LOG_CHECKS = MP_TESTS / "log_checks.py"
CLASS_KEYS = ("dropped_readings", "dropped_events", "dropped_billing")

import log  # noqa: E402  (firmware/, put on sys.path by conftest)
import log_checks as lc  # noqa: E402


# ---------------------------------------------------------------- the format, from SPEC.md


def parse_segment(data: bytes):
    """(epoch, [records], offset where valid records end) of one segment file."""
    assert data[:4] == b"VGL\x01", "segment magic"
    assert crc32(data[:8]) == int.from_bytes(data[8:12], "little"), "header CRC"
    epoch = int.from_bytes(data[4:8], "little")
    recs = []
    p = 12
    while p + 15 <= len(data):
        n = int.from_bytes(data[p : p + 2], "little")
        payload = data[p + 6 : p + 6 + n]
        if n < 9 or len(payload) < n or crc32(data[p : p + 2] + payload) != int.from_bytes(data[p + 2 : p + 6], "little"):
            break
        seq, ts, rtype = struct.unpack("<IIB", payload[:9])
        recs.append({"seq": seq, "ts": ts, "type": rtype, "body": payload[9:], "offset": p, "size": 6 + n})
        p += 6 + n
    return epoch, recs, p


def seg_paths(root: Path) -> list[Path]:
    return sorted((root / "log").glob("*.seg"))


def meta_bytes(next_seq, acked, dropped=(0, 0, 0), lost=0, torn=0) -> bytes:
    b = struct.pack("<4sIIIIIII", b"VGM\x01", next_seq, acked, *dropped, lost, torn)
    return b + struct.pack("<I", crc32(b))


def served(survey) -> dict:
    """seq -> epoch of every record a survey read."""
    out = {}
    for first, last, epoch in survey["runs"]:
        for s in range(first, last + 1):
            out[s] = epoch
    return out


def assert_clean(sv):
    assert sv["bad"] == [], f"records served with wrong contents: {sv['bad']}"
    assert sv["order_ok"], "records served out of order"


# ---------------------------------------------------------------- format and basics


def test_record_layout_and_sizes_match_the_spec(mp_worker, tmp_path):
    res = mp_worker.call("log_checks", "fill", str(tmp_path), 7, 40, 512, 65536, lc.MIXED)
    assert res["seqs"] == list(range(1, 41))
    recs = []
    for p in seg_paths(tmp_path):
        epoch, got, end = parse_segment(p.read_bytes())
        assert epoch == 7 and end == p.stat().st_size
        assert got and p.name == f"{got[0]['seq']:08x}.seg"
        assert 12 + sum(r["size"] for r in got) <= 512
        recs += got
    assert [r["seq"] for r in recs] == list(range(1, 41))
    for r in recs:
        assert r["ts"] == lc.ts_of(r["seq"]) and r["type"] == lc.rtype_of(r["seq"], lc.MIXED)
        assert r["body"] == lc.body_of(r["seq"], r["type"])
        assert r["size"] == 15 + len(r["body"])
    # DESIGN.md budget: a reading is at most 32 bytes in the log; the largest
    # reading body of 4 ints below 65536 makes 28
    readings = [r["size"] for r in recs if r["type"] < wire.LOG_READINGS_END]
    assert readings and max(readings) <= 32
    assert 15 + len(lc.cbor.dumps([65535, 65535, 65535, 65535])) == 28


def test_record_classes_follow_wire():
    assert log._READINGS_END == wire.LOG_READINGS_END and log._EVENTS_END == wire.LOG_EVENTS_END
    assert [log._cls(t) for t in (1, 31, 32, 63, 64, 95)] == [0, 0, 1, 1, 2, 2]


def test_append_then_read_after_a_reboot(interp, tmp_path):
    root = str(tmp_path / "board")
    res = interp.call("log_checks", "fill", root, 3, 30, 256, 65536, lc.MIXED)
    assert res["seqs"] == list(range(1, 31)) and res["stats"]["next"] == 31
    sv = interp.call("log_checks", "survey", root, 4, 256, 65536, lc.MIXED)
    assert_clean(sv)
    assert sv["runs"] == [[1, 30, 3]]
    st = sv["stats"]
    assert (st["first"], st["last"], st["next"], st["acked"]) == (1, 30, 31, 0)
    assert st["bytes"] == sum(p.stat().st_size for p in seg_paths(Path(root)))


def test_sequence_continues_and_every_boot_starts_a_segment_with_its_epoch(mp_worker, tmp_path):
    res = mp_worker.call("log_checks", "boots", str(tmp_path), [5, 9, 12], 4, 4096, 65536)
    assert res["recs"] == [[s, 5] for s in range(1, 5)] + [[s, 9] for s in range(5, 9)] + [[s, 12] for s in range(9, 13)]
    assert [st["next"] for st in res["stats"]] == [1, 5, 9]
    files = seg_paths(tmp_path)
    # one per boot, named by its first seq; the last boot's (epoch 13) holds nothing yet
    assert [p.name for p in files] == ["00000001.seg", "00000005.seg", "00000009.seg", "0000000d.seg"]
    assert [parse_segment(p.read_bytes())[0] for p in files] == [5, 9, 12, 13]


def test_boots_without_appends_leave_one_empty_segment(mp_worker, tmp_path):
    res = mp_worker.call("log_checks", "boots", str(tmp_path), [1, 2, 3, 4, 5, 6], 0, 4096, 65536)
    assert res["recs"] == [] and [st["next"] for st in res["stats"]] == [1] * 6
    files = seg_paths(tmp_path)
    assert [p.name for p in files] == ["00000001.seg"] and parse_segment(files[0].read_bytes())[0] == 7


def test_read_honours_from_seq_and_both_bounds(mp_worker, tmp_path):
    def window(*args):
        shutil.rmtree(tmp_path / "log", ignore_errors=True)
        return mp_worker.call("log_checks", "read_window", str(tmp_path), 40, *args)

    got = window(1, 64, 1 << 20)
    assert [r[0] for r in got] == list(range(1, 41))
    assert [r[0] for r in window(17, 5, 1 << 20)] == [17, 18, 19, 20, 21]
    small = window(5, 64, 100)  # records as stored are 15 + body bytes
    assert [r[0] for r in small] == list(range(5, 5 + len(small))) and sum(15 + r[1] for r in small) <= 100
    assert len(window(5, 64, 1)) == 1, "a record larger than max_bytes still comes, alone"
    assert window(41, 64, 4096) == []


def test_ack_frees_whole_segments_but_never_the_open_one(mp_worker, tmp_path):
    res = mp_worker.call("log_checks", "ack_frees", str(tmp_path / "a"), 40, 25, 256)
    assert res["acked"] == 25 and res["reboot"]["acked"] == 25
    kept_first = [int(n[:8], 16) for n in res["after"]]
    freed = sorted(set(res["before"]) - set(res["after"]))
    assert freed, "some segment lies wholly at or below seq 25"
    # a segment is freed when every record in it is <= 25: the one after it starts at <= 26
    assert kept_first[0] <= 26 and res["first"] == [kept_first[0]]
    assert res["stats"]["first"] == kept_first[0]

    res = mp_worker.call("log_checks", "ack_frees", str(tmp_path / "b"), 40, 10**6, 256)
    assert res["acked"] == 40, "an ack beyond the last record stops there"
    assert res["after"] == res["before"][-1:], "everything but the open segment is freed"
    assert res["reboot"]["next"] == 41 and res["reboot"]["first"] == 0 and res["reboot"]["acked"] == 40


def test_bad_arguments_are_refused(interp, tmp_path):
    res = interp.call("log_checks", "refusals", str(tmp_path))
    assert res == {
        "type 0": "ValueError",
        "type 96": "ValueError",
        "body too long": "ValueError",
        "largest body": 1,
        "not bytes": 2,
        "encoded": lc.cbor.dumps({"k": [1, 2]}).hex(),
        "max_bytes < 2 segments": "ValueError",
        "tiny segments": "ValueError",
    }


# ---------------------------------------------------------------- capacity and thinning


def test_thinning_drops_readings_then_events_then_billing(mp_worker, tmp_path):
    res = mp_worker.call("log_checks", "thinning_phases", str(tmp_path), 256, 1024)
    trace, appended = res["trace"], res["appended"]
    assert trace, "the log filled up"
    first_event_drop = next(i for i, t in enumerate(trace) if t["stats"]["dropped_events"])
    first_billing_drop = next(i for i, t in enumerate(trace) if t["stats"]["dropped_billing"])
    assert first_event_drop < first_billing_drop
    for t in trace:
        st, held = t["stats"], t["held"]
        # counts are exact: what was appended and is not held was dropped (nothing acked)
        upto = [[s for s in appended[c] if s <= t["seq"]] for c in range(3)]
        for c in range(3):
            assert st[CLASS_KEYS[c]] == len(upto[c]) - len(held[c]), (t["seq"], c)
        if st["dropped_events"]:
            assert held[0] in ([], [t["seq"]]), "an event was dropped while a reading was held"
        if st["dropped_billing"]:
            assert held[0] + held[1] in ([], [t["seq"]]), "a billing record was dropped while others were held"
        # the survivors of a class are its newest records
        for c in range(3):
            assert held[c] == upto[c][len(upto[c]) - len(held[c]) :]
    last = trace[-1]["stats"]
    assert last["bytes"] <= 1024 and last["dropped_readings"] == len(appended[0])


@pytest.mark.parametrize("seed", [1, 2])
def test_random_appends_reads_acks_and_reboots_keep_every_invariant(interp, tmp_path, seed):
    done = interp.call("log_checks", "soak", str(tmp_path), seed, 1500, 256, 2048)
    assert done["thinned"] > 20 and done["reboot"] > 10 and done["ack"] > 50
    assert done["stats"]["dropped_billing"] > 0 and done["stats"]["bytes"] <= 2048


# ---------------------------------------------------------------- damage at rest


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


FINISHED = 14


@pytest.fixture
def finished_log(mp_worker, tmp_path):
    """FINISHED mixed records in 256-byte segments, written and closed cleanly."""
    root = tmp_path / "pristine"
    mp_worker.call("log_checks", "fill", str(root), 1, FINISHED, 256, 65536, lc.MIXED)
    files = seg_paths(root)
    _, recs, _ = parse_segment(files[-1].read_bytes())
    assert len(files) >= 2 and len(recs) >= 3 and recs[-1]["seq"] == FINISHED
    return root, files[-1].name, recs


def _survey_twice(mp_worker, root):
    """A boot after the damage, and one more (which must find nothing left to cut)."""
    a = mp_worker.call("log_checks", "survey", str(root), 2, 256, 65536, lc.MIXED)
    b = mp_worker.call("log_checks", "survey", str(root), 3, 256, 65536, lc.MIXED)
    assert_clean(a)
    assert_clean(b)
    for k in ("torn_bytes", "lost_bytes", "first", "last"):
        assert a["stats"][k] == b["stats"][k], k
    assert served(a) == served(b) and b["stats"]["next"] == a["stats"]["next"]
    return a


def test_tail_truncated_at_every_length_inside_the_last_records(mp_worker, tmp_path, finished_log):
    pristine, name, recs = finished_log
    start = recs[-2]["offset"]
    size = recs[-1]["offset"] + recs[-1]["size"]
    for cut in range(start, size):
        root = _fresh_copy(pristine, tmp_path / "case")
        os.truncate(root / "log" / name, cut)
        sv = _survey_twice(mp_worker, root)
        whole = [r for r in recs if r["offset"] + r["size"] <= cut]
        keep = (whole[-1]["seq"] if whole else recs[0]["seq"] - 1)
        got = served(sv)
        assert sorted(got) == list(range(1, keep + 1)), cut
        assert set(got.values()) == {1}
        partial = cut - (whole[-1]["offset"] + whole[-1]["size"] if whole else recs[0]["offset"])
        assert sv["stats"]["torn_bytes"] == partial and sv["stats"]["lost_bytes"] == 0
        # a record whose bytes were partly there keeps its seq: the next one is above it
        assert sv["stats"]["next"] >= keep + 1 + (1 if partial else 0), cut


def test_flipped_bytes_in_the_tail_are_never_served(mp_worker, tmp_path, finished_log):
    pristine, name, recs = finished_log
    start = recs[-2]["offset"]
    size = recs[-1]["offset"] + recs[-1]["size"]
    for at in range(start, size):
        root = _fresh_copy(pristine, tmp_path / "case")
        path = root / "log" / name
        data = bytearray(path.read_bytes())
        data[at] ^= 0xA5
        path.write_bytes(data)
        sv = _survey_twice(mp_worker, root)
        hit = next(r for r in recs if r["offset"] <= at < r["offset"] + r["size"])
        assert sorted(served(sv)) == list(range(1, hit["seq"])), at
        assert sv["stats"]["torn_bytes"] == size - hit["offset"]
        assert sv["stats"]["next"] > FINISHED, "seqs whose bytes were still there are not reused"


def test_damage_in_an_older_segment_cuts_that_segment_only(mp_worker, tmp_path, finished_log):
    pristine, _, _ = finished_log
    first = seg_paths(pristine)[0]
    _, recs, end = parse_segment(first.read_bytes())
    for label, at in (("header", 5), ("record", recs[1]["offset"] + 8)):
        root = _fresh_copy(pristine, tmp_path / "case")
        path = root / "log" / first.name
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01
        path.write_bytes(data)
        sv = _survey_twice(mp_worker, root)
        got = sorted(served(sv))
        if label == "header":  # the epoch is unknown: the whole segment goes
            lost = list(range(1, recs[-1]["seq"] + 1))
            assert sv["stats"]["lost_bytes"] == end
        else:
            lost = list(range(recs[1]["seq"], recs[-1]["seq"] + 1))
            assert sv["stats"]["lost_bytes"] == end - recs[1]["offset"]
        assert got == [s for s in range(1, FINISHED + 1) if s not in lost], label
        assert sv["stats"]["torn_bytes"] == 0 and sv["stats"]["next"] > FINISHED


def test_damage_found_by_read_is_cut_counted_and_never_served(mp_worker, tmp_path):
    # flip a byte in the third record of the second segment while the log is open
    probe = tmp_path / "probe"  # the same appends, to find the record's place
    mp_worker.call("log_checks", "fill", str(probe), 1, 30, 256, 65536, lc.MIXED)
    _, recs, end = parse_segment(seg_paths(probe)[1].read_bytes())
    at = recs[2]["offset"] + 10
    res = mp_worker.call("log_checks", "corrupt_while_open", str(tmp_path / "b"), 256, 30, 1, at)
    first, second, reboot = res["first"], res["second"], res["reboot"]
    for sv in (first, second, reboot):
        assert_clean(sv)
        got = sorted(served(sv))
        assert all(s not in got for s in range(recs[2]["seq"], recs[-1]["seq"] + 1))
        assert [s for s in range(1, 31) if s not in got] == list(range(recs[2]["seq"], recs[-1]["seq"] + 1))
    for sv in (first, second, reboot):
        assert sv["stats"]["lost_bytes"] == end - recs[2]["offset"]
    assert res["appended"] == 31 and reboot["stats"]["next"] == 32


def test_stray_temporary_files_are_discarded_and_a_committed_meta_is_kept(mp_worker, tmp_path):
    root = tmp_path / "b"
    mp_worker.call("log_checks", "fill", str(root), 1, 20, 256, 65536, lc.MIXED)
    before = mp_worker.call("log_checks", "survey", str(root), 2, 256, 65536, lc.MIXED)
    d = root / "log"
    # an interrupted rewrite: thin.tmp (half written) and its staged meta.new
    (d / "thin.tmp").write_bytes(b"VGL\x01" + bytes(20))
    (d / "meta.new").write_bytes(meta_bytes(21, 0, (99, 0, 0)))
    (d / "seg.tmp").write_bytes(b"VGL")
    (d / "0000zzzz.seg").write_bytes(b"not ours")  # files it did not write are left alone
    sv = mp_worker.call("log_checks", "survey", str(root), 3, 256, 65536, lc.MIXED)
    assert served(sv) == served(before) and sv["stats"]["dropped_readings"] == 0
    assert [p.name for p in d.iterdir() if not p.name.endswith(".seg")] == []
    assert (d / "0000zzzz.seg").read_bytes() == b"not ours"
    (d / "0000zzzz.seg").unlink()
    # a rewrite that committed (thin.tmp renamed) but crashed before meta.new became meta
    (d / "meta.new").write_bytes(meta_bytes(21, 4, (5, 6, 7), 8, 9))
    st = mp_worker.call("log_checks", "survey", str(root), 4, 256, 65536, lc.MIXED)["stats"]
    keys = ("acked", "dropped_readings", "dropped_events", "dropped_billing", "lost_bytes", "torn_bytes")
    assert [st[k] for k in keys] == [4, 5, 6, 7, 8, 9]
    assert (d / "meta").read_bytes() == meta_bytes(21, 4, (5, 6, 7), 8, 9)
    # a half-written meta.new (a crash inside an ack) is ignored
    (d / "meta.new").write_bytes(meta_bytes(21, 9, (0, 0, 0))[:20])
    st = mp_worker.call("log_checks", "survey", str(root), 5, 256, 65536, lc.MIXED)["stats"]
    assert st["acked"] == 4 and not (d / "meta.new").exists()


# ---------------------------------------------------------------- a crash at every step


def _check_crash_cases(res, n_pre, garbage):
    base = res["base"]
    base_held = served(base)
    kinds = {s: log._cls(lc.rtype_of(s, lc.MIXED)) for s in range(1, n_pre + 200)}
    for case in res["cases"]:
        sv = case["survey"]
        where = f"crash at step {case['k']} ({case['hit']}, left {case['left']})"
        assert_clean(sv)
        st = sv["stats"]
        assert sv["moved"] == [], where
        got = {s: e for s, e in base_held.items() if s not in set(sv["gone"])}
        got.update({s: e for s, e in sv["extra"]})
        known = dict(base_held)
        known.update({s: 3 for s in case["appended"]})
        new = [s for s in got if s not in known]
        # at most the append in flight, of the crashed boot, above those that returned
        assert len(new) <= 1 and all(got[s] == 3 and s > max(known) for s in new), where
        assert all(known.get(s, 3) == got[s] for s in got), where
        for c in range(3):
            missing = [s for s in known if s not in got and kinds[s] == c]
            assert st[CLASS_KEYS[c]] - base["stats"][CLASS_KEYS[c]] == len(missing), (where, c, missing)
        assert st["lost_bytes"] == garbage and st["acked"] == 0, where
        assert st["bytes"] == sv["bytes_on_disk"] and sv["bytes_after_crash"] <= st["max_bytes"] // 2, where
        assert st["next"] > max([*known, *got]), where
    return {(c["hit"].split()[0], frozenset(c["left"])) for c in res["cases"]}


CRASH_SCRIPT = r"""
import sys
import log_checks
from vgemit import emit

a = sys.argv[1:]
res = log_checks.crash_points(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), 1, int(a[5]), int(a[6]), emit)
emit({"base": res["base"], "steps_without_crash": res["steps_without_crash"]})
"""


def crash_points(where, root: Path, mp, seg_bytes, max_bytes, n_pre, n_more, garbage):
    """log_checks.crash_points in this process or, case by case, in
    MicroPython from the .mpy build."""
    args = [seg_bytes, max_bytes, n_pre, n_more]
    if where == "cpython":
        return lc.crash_points(str(root), *args, 1, 400, garbage)
    recs = mp.run(code=CRASH_SCRIPT, args=[root, *args, 400, garbage], compiled=True, timeout=600).records
    return {**recs[-1], "cases": recs[:-1]}


@pytest.mark.parametrize("where", ["cpython", "micropython"])
def test_a_crash_at_any_step_of_thinning_loses_nothing_it_was_not_dropping(where, mp, tmp_path):
    # 5 bad bytes after the newest records: each boot cuts them first, so the
    # first steps crash inside that cut
    res = crash_points(where, tmp_path, mp, 256, 768, 200, 8, 5)
    assert res["cases"] and len(res["cases"]) < 400, "the runs ended without a crash"
    hits = _check_crash_cases(res, 200, 5)
    assert ("write", frozenset({"thin.tmp"})) in hits, "a crash while writing the rewritten segment"
    assert ("write", frozenset({"thin.tmp", "meta.new"})) in hits, "a crash while staging meta"
    assert ("rename", frozenset({"meta.new"})) in hits, "a crash after the commit, before meta"
    assert ("rename", frozenset({"seg.tmp"})) in hits, "a crash while starting a segment"
    assert any(h == "remove" for h, _ in hits), "a crash before an emptied segment went"
    assert res["base"]["stats"]["dropped_billing"] > 0, "the scenario thins all three classes"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOLTGATE_SLOW"), reason="long crash-point run: set VOLTGATE_SLOW=1")
@pytest.mark.parametrize("max_bytes,n_pre,n_more,garbage", [(1024, 60, 40, 0), (768, 200, 30, 20), (4096, 700, 30, 1)])
def test_a_crash_at_any_step_long_run(mp, tmp_path, max_bytes, n_pre, n_more, garbage):
    _check_crash_cases(crash_points("micropython", tmp_path, mp, 256, max_bytes, n_pre, n_more, garbage), n_pre, garbage)


# ---------------------------------------------------------------- SIGKILL campaigns


class Subject:
    """log_checks.py `append` in a MicroPython process of its own."""

    def __init__(self, path: list[str], root: Path, epoch: int, seg_bytes: int, max_bytes: int, mix: str, ack_every: int):
        env = dict(os.environ, MICROPYPATH=os.pathsep.join([".frozen", *path]))
        self.err = tempfile.TemporaryFile()
        args = [mpy.binary(), str(LOG_CHECKS), "append", str(root), str(epoch), str(seg_bytes), str(max_bytes), mix, str(ack_every)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.err, env=env)
        self.buf = b""

    def line(self, timeout=30.0):
        """The next complete line, or None at end of output."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no output from the log subject within {timeout} s\n{self.stderr()}"
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def kill(self) -> list[str]:
        """SIGKILL, then the complete lines it printed before dying."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        rest = []
        while (line := self.line()) is not None:
            rest.append(line)
        return rest

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


class Seen:
    """What the test knows of a log under a kill campaign."""

    def __init__(self):
        self.known: dict[int, int] = {}  # seq -> epoch, of records printed or ever served
        self.printed: dict[int, int] = {}
        self.acked = 0  # the highest ack a subject printed
        # the seq each killed subject may have been appending when it died
        # (None: unknown), until a survey serves it; one that was written and
        # then thinned away unseen is counted as dropped but never missed
        self.in_flight: list[int | None] = []


def kill_campaign(path, root: Path, rounds: int, seed: int, seg_bytes: int, max_bytes: int, ack_every: int):
    """Boot, append, SIGKILL, `rounds` times, then one last boot. Each boot's
    survey is held to what earlier processes printed."""
    rng = random.Random(seed)
    seen = Seen()
    kills = {"boot": 0, "appending": 0}
    for epoch in range(1, rounds + 2):
        # -1: kill at once (during boot: imports, scan, cuts, the new segment);
        # 0: right after the boot survey; n: after n confirmed appends
        wait = 0 if epoch == rounds + 1 else rng.choice([-1] * 8 + [0] * 4 + list(range(1, 80)))
        subject = Subject(path, root, epoch, seg_bytes, max_bytes, lc.MIXED, ack_every)
        boot_next = None
        try:
            lines = []
            if wait >= 0:
                first = subject.line()
                assert first and first.startswith("B"), f"round {epoch}: {first!r}\n{subject.stderr()}"
                sv = json.loads(first[1:])
                check_boot(sv, epoch, seen, ack_every, f"seed {seed}, boot {epoch}")
                boot_next = sv["stats"]["next"]
                while len(lines) < wait:
                    line = subject.line()
                    assert line is not None, f"seed {seed}, boot {epoch}: the subject died\n{subject.stderr()}"
                    lines.append(line)
                kills["appending"] += 1
            else:
                kills["boot"] += 1
            lines += subject.kill()
        finally:
            subject.close()
        last = boot_next
        for line in lines:
            if line.startswith("a"):
                seen.acked = max(seen.acked, int(line[1:]))
            elif line[:1].isdigit():
                last = int(line) + 1
                seen.printed[last - 1] = seen.known[last - 1] = epoch
        seen.in_flight.append(last)
    return {"known": len(seen.known), "kills": kills}


def check_boot(sv, epoch, seen: Seen, ack_every, where):
    assert_clean(sv)
    st = sv["stats"]
    got = served(sv)
    known = seen.known
    assert st["lost_bytes"] == 0, where
    assert st["bytes"] == sv["bytes_on_disk"] <= st["max_bytes"], where
    assert st["acked"] >= seen.acked, f"{where}: an ack that returned was forgotten"
    # new to us: only a record whose append had not returned when its process
    # died, at most one per boot, above everything that boot printed
    new = [s for s in got if s not in known]
    for s in new:
        mine = [p for p, e in seen.printed.items() if e == got[s]]
        assert got[s] < epoch and s > max(mine, default=0), f"{where}: unexpected record {s} of epoch {got[s]}"
    assert len({got[s] for s in new}) == len(new), f"{where}: two unconfirmed records from one boot: {new}"
    known.update({s: got[s] for s in new})
    seen.in_flight = [s for s in seen.in_flight if s not in got]
    # a record keeps its seq and epoch across boots
    assert all(known[s] == got[s] for s in got), where
    missing = [s for s in known if s not in got]
    if ack_every:  # acknowledged records may go; nothing else
        assert all(s <= st["acked"] for s in missing), f"{where}: lost {[s for s in missing if s > st['acked']][:5]}"
    else:  # no acks: what is gone was dropped by thinning, and counted
        extra = []
        for c in range(3):
            n = len([s for s in missing if log._cls(lc.rtype_of(s, lc.MIXED)) == c])
            extra.append(st[CLASS_KEYS[c]] - n)
            could = len([s for s in seen.in_flight if s is None or log._cls(lc.rtype_of(s, lc.MIXED)) == c])
            assert 0 <= extra[c] <= could, f"{where}: {CLASS_KEYS[c]} {st[CLASS_KEYS[c]]}, {n} missing, {could} unseen"
        assert sum(extra) <= len(seen.in_flight), where
    assert st["next"] > max(known, default=0), f"{where}: next seq {st['next']} would repeat one"


@pytest.fixture(scope="module")
def compiled_path(firmware_build):
    return [str(MP_TESTS), *build.board_path(firmware_build)]


def test_power_cut_while_appending_and_acking(compiled_path, tmp_path):
    res = kill_campaign(compiled_path, tmp_path, 40, 20261124, 256, 1 << 20, 25)
    assert res["kills"]["boot"] >= 1 and res["kills"]["appending"] >= 30 and res["known"] > 500


def test_power_cut_while_thinning(compiled_path, tmp_path):
    res = kill_campaign(compiled_path, tmp_path, 40, 20261125, 256, 2048, 0)
    assert res["known"] > 500


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOLTGATE_SLOW"), reason="long kill campaign: set VOLTGATE_SLOW=1")
@pytest.mark.parametrize("max_bytes,ack_every", [(1 << 20, 25), (2048, 0), (8192, 0)])
def test_power_cut_long_campaign(compiled_path, tmp_path, max_bytes, ack_every):
    seed = int(os.environ.get("VOLTGATE_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
    kill_campaign(compiled_path, tmp_path, int(os.environ.get("VOLTGATE_KILLS", "1000")), seed, 256, max_bytes, ack_every)


# ---------------------------------------------------------------- heap, from the .mpy build

HEAP_SCRIPT = r"""
import gc
import sys
import micropython
import cbor
import log
from vgemit import emit

root = sys.argv[1]
body = cbor.dumps([3, 3700, 1500, 250])
lg = log.Log(root, 1, 4096, 131072)
i = 0
while i < 2000:
    lg.append(1, body, 1800000000 + i)
    i += 1
lg.close()
lg = None
gc.collect()
h0 = gc.mem_alloc()
lg = log.Log(root, 2, 4096, 131072)
gc.collect()
h1 = gc.mem_alloc()
lg.append(1, body, 1800000000)
a0 = micropython.mem_total()
i = 0
while i < 100:
    lg.append(1, body, 1800000000 + i)
    i += 1
per_append = (micropython.mem_total() - a0) / 100
a0 = micropython.mem_total()
got = lg.read(1000, 64, 2048)
read_alloc = micropython.mem_total() - a0
emit({"log_heap": h1 - h0, "per_append": per_append, "read": len(got), "read_alloc": read_alloc, "stats": lg.stats()})
"""


def test_append_allocates_nothing_and_the_log_fits_the_outlet_heap(mp, tmp_path):
    res = mp.run(code=HEAP_SCRIPT, args=[tmp_path], compiled=True, heapsize=64 * 1024).record
    assert res["per_append"] == 0
    assert res["read"] == 64 and res["stats"]["next"] == 2102
    # segment buffer (4 KB) + an index of 13 segments
    assert res["log_heap"] < 8 * 1024, res
