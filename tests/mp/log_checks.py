# Runs on MicroPython and CPython: the flash log checks of tests/test_log.py.
#
# Every record the checks write has contents that follow from its seq alone
# (rtype_of, body_of, ts_of), so a reader can tell an intact record from a
# damaged or misplaced one without keeping a copy. survey() opens a log (a
# boot), reads all of it through Log.read and reports what it found.
#
# Run as a script it is the power-cut subject (test_log.py kills it):
#   log_checks.py append ROOT EPOCH SEG_BYTES MAX_BYTES MIX ACK_EVERY
# prints "B" + the boot survey as JSON, then appends forever, printing each
# seq after append() returned (and "a" + seq after an ack returned).
import json
import os
import sys

import cbor
import log

TS0 = 1800000000
READINGS = "readings"
MIXED = "mixed"


# ---------------------------------------------------------------- record contents


def rtype_of(seq, mix):
    if mix == READINGS:
        return 1
    k = seq % 10
    if k == 0:
        return 64 + seq % 5  # billing
    if k == 3 or k == 7:
        return 32 + seq % 7  # event
    return 1 + seq % 2  # reading


def body_of(seq, rtype):
    if rtype < 32:  # a reading: 4 ints (slot, mV, mA, 0.1 degC)
        return cbor.dumps([seq % 16, 3000 + seq % 1200, seq & 0xFFFF, 200 + seq % 100])
    return cbor.dumps([seq, "e" * (seq % 23)])


def ts_of(seq):
    return TS0 + seq


def cls_of(rtype):
    return 0 if rtype < 32 else (1 if rtype < 64 else 2)


def append_next(lg, mix):
    seq = lg.next_seq
    t = rtype_of(seq, mix)
    got = lg.append(t, body_of(seq, t), ts_of(seq))
    if got != seq:
        raise AssertionError("append returned %d, next_seq was %d" % (got, seq))
    return got


def read_all(lg, batch=50, max_bytes=1500):
    out = []
    s = 0
    while True:
        got = lg.read(s, batch, max_bytes)
        if not got:
            return out
        out.extend(got)
        s = got[-1][0] + 1


def survey_log(lg, mix):
    """{"stats", "runs": [[first, last, epoch], ...] of consecutive seqs,
    "bad": [seqs whose contents are wrong], "order_ok"}"""
    runs = []
    bad = []
    order_ok = True
    prev = 0
    for seq, ep, ts, t, body in read_all(lg):
        if seq <= prev:
            order_ok = False
        if ts != ts_of(seq) or t != rtype_of(seq, mix) or body != body_of(seq, t):
            bad.append(seq)
        if runs and runs[-1][1] == seq - 1 and runs[-1][2] == ep:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq, ep])
        prev = seq
    return {"stats": lg.stats(), "runs": runs, "bad": bad, "order_ok": order_ok}


def survey(root, epoch, seg_bytes, max_bytes, mix):
    lg = log.Log(root, epoch, seg_bytes, max_bytes)
    try:
        return survey_log(lg, mix)
    finally:
        lg.close()


def fill(root, epoch, n, seg_bytes, max_bytes, mix):
    """Append n records in one boot; return their seqs and the stats."""
    lg = log.Log(root, epoch, seg_bytes, max_bytes)
    seqs = []
    while len(seqs) < n:
        seqs.append(append_next(lg, mix))
    st = lg.stats()
    lg.close()
    return {"seqs": seqs, "stats": st}


def boots(root, epochs, per_boot, seg_bytes, max_bytes):
    """One boot per epoch, appending per_boot readings in each; then what a
    last boot reads: [[seq, epoch], ...] and the stats of every boot."""
    stats = []
    for ep in epochs:
        lg = log.Log(root, ep, seg_bytes, max_bytes)
        stats.append(lg.stats())
        i = 0
        while i < per_boot:
            append_next(lg, READINGS)
            i += 1
        lg.close()
    lg = log.Log(root, epochs[-1] + 1, seg_bytes, max_bytes)
    recs = [[r[0], r[1]] for r in read_all(lg)]
    lg.close()
    return {"recs": recs, "stats": stats}


def seg_files(root):
    return sorted(n for n in os.listdir(root + "/log") if n.endswith(".seg"))


def seg_bytes_on_disk(root):
    n = 0
    for name in seg_files(root):
        n += os.stat(root + "/log/" + name)[6]
    return n


# ---------------------------------------------------------------- read bounds and ack


def read_window(root, n, from_seq, max_records, max_bytes):
    lg = log.Log(root, 1, 256, 65536)
    while lg.next_seq <= n:
        append_next(lg, MIXED)
    got = lg.read(from_seq, max_records, max_bytes)
    lg.close()
    return [[r[0], len(r[4])] for r in got]


def ack_frees(root, n, upto, seg_bytes):
    """Append n mixed records, ack upto; report files and stats before and
    after, and after a reboot."""
    lg = log.Log(root, 1, seg_bytes, 65536)
    while lg.next_seq <= n:
        append_next(lg, MIXED)
    before = seg_files(root)
    got = lg.ack(upto)
    after = seg_files(root)
    st = lg.stats()
    first = [r[0] for r in lg.read(0, 1)]
    lg.close()
    lg = log.Log(root, 2, seg_bytes, 65536)
    st2 = lg.stats()
    lg.close()
    return {"acked": got, "before": before, "after": after, "stats": st, "first": first, "reboot": st2}


def refusals(root):
    lg = log.Log(root, 1, 256, 1024)
    out = {}

    def refused(name, *args):
        try:
            out[name] = lg.append(*args)
        except ValueError as e:
            out[name] = type(e).__name__

    refused("type 0", 0, b"\x80", 1)
    refused("type 96", 96, b"\x80", 1)
    refused("body too long", 1, bytes(256 - 12 - 15 + 1), 1)
    refused("largest body", 1, bytes(256 - 12 - 15), 1)
    refused("not bytes", 40, {"k": [1, 2]}, 2)
    out["encoded"] = lg.read(2)[0][4].hex()
    lg.close()
    for name, seg, mx in (("max_bytes < 2 segments", 256, 511), ("tiny segments", 32, 1024)):
        try:
            log.Log(root, 2, seg, mx)
            out[name] = "opened"
        except ValueError as e:
            out[name] = type(e).__name__
    return out


# ---------------------------------------------------------------- thinning


def thinning_phases(root, seg_bytes, max_bytes):
    """Billing and events first, then readings until the log is full, then
    events, then billing. After each append: the stats, and the seqs still
    held by class. Returns a trace of the appends that dropped something."""
    lg = log.Log(root, 1, seg_bytes, max_bytes)
    kinds = {}
    trace = []

    def add(t, seq_body):
        seq = lg.next_seq
        before = lg.stats()
        lg.append(t, seq_body, ts_of(seq))
        kinds[seq] = cls_of(t)
        st = lg.stats()
        if st["bytes"] > max_bytes or st["bytes"] != seg_bytes_on_disk(root):
            raise AssertionError("bytes %d, on disk %d, max %d" % (st["bytes"], seg_bytes_on_disk(root), max_bytes))
        if st["dropped_readings"] + st["dropped_events"] + st["dropped_billing"] != before["dropped_readings"] + before[
            "dropped_events"
        ] + before["dropped_billing"]:
            held = [[], [], []]
            for r in read_all(lg):
                held[kinds[r[0]]].append(r[0])
            trace.append({"seq": seq, "cls": cls_of(t), "stats": st, "held": held})

    for i in range(3):
        add(64, cbor.dumps([i, "billing"]))
        add(33, cbor.dumps([i, "event"]))
    for i in range(200):
        add(1, cbor.dumps([i % 8, 3700, 1500, 250]))
    for i in range(200):
        add(35, cbor.dumps([i, "alarm"]))
    for i in range(200):
        add(68, cbor.dumps([i, 123456]))
    appended = [[], [], []]
    for s in sorted(kinds):
        appended[kinds[s]].append(s)
    lg.close()
    return {"trace": trace, "appended": appended}


def soak(root, seed, steps, seg_bytes, max_bytes):
    """Random appends (all classes, bodies of 1..80 bytes), reads, acks and
    reboots against a model of what was appended. Raises AssertionError on
    the first broken invariant; returns counts of what it did."""
    import random

    random.seed(seed)
    model = _Model()
    epoch = 1
    lg = log.Log(root, epoch, seg_bytes, max_bytes)
    done = {"append": 0, "read": 0, "ack": 0, "reboot": 0, "thinned": 0}
    i = 0
    while i < steps:
        i += 1
        r = random.getrandbits(8)
        if r < 200:
            seq = lg.next_seq
            t = random.choice((1, 2, 1, 3, 33, 35, 64, 68))
            body = cbor.dumps(["x" * random.getrandbits(6), seq])
            before = lg.stats()
            lg.append(t, body, TS0 + seq)
            model.held[seq] = (epoch, TS0 + seq, t, body)
            done["append"] += 1
            _check_append(lg, model, before, seq, max_bytes, root)
            if lg.stats()["dropped_readings"] != before["dropped_readings"]:
                done["thinned"] += 1
        elif r < 225:
            frm = random.getrandbits(12) % (lg.next_seq + 2)
            m = 1 + random.getrandbits(5)
            b = random.getrandbits(10)
            _check_read(lg, model, frm, m, b)
            done["read"] += 1
        elif r < 245:
            upto = random.getrandbits(12) % (lg.next_seq + 3)
            lg.ack(upto)
            done["ack"] += 1
            _check_consistent(lg, model, root, max_bytes)
        else:
            held = read_all(lg)
            st = lg.stats()
            lg.close()
            epoch += 1
            lg = log.Log(root, epoch, seg_bytes, max_bytes)
            st2 = lg.stats()
            for k in ("next", "acked"):
                if st[k] != st2[k]:
                    raise AssertionError("reboot changed %s: %r -> %r" % (k, st[k], st2[k]))
            # the boot may free acknowledged segments, and thin to make room
            # for its segment header, counting what it drops
            now = read_all(lg)
            gone = len([r for r in held if r[0] > st["acked"]]) - len([r for r in now if r[0] > st["acked"]])
            if gone != _drops(st2) - _drops(st) or [r for r in now if r not in held]:
                raise AssertionError("reboot lost %d unacknowledged records, counted %d" % (gone, _drops(st2) - _drops(st)))
            _check_consistent(lg, model, root, max_bytes)
            done["reboot"] += 1
    _check_consistent(lg, model, root, max_bytes)
    done["stats"] = lg.stats()
    lg.close()
    return done


def _drops(st):
    return st["dropped_readings"] + st["dropped_events"] + st["dropped_billing"]


def _check_read(lg, model, frm, m, b):
    full = [r for r in read_all(lg) if r[0] >= frm]
    got = lg.read(frm, m, b)
    if got != full[: len(got)]:
        raise AssertionError("read(%d, %d, %d) is not a prefix of the records from there" % (frm, m, b))
    size = 0
    for r in got:
        size += 15 + len(r[4])
    if len(got) > m or (len(got) > 1 and size > b):
        raise AssertionError("read(%d, %d, %d) returned %d records, %d bytes" % (frm, m, b, len(got), size))
    if full and not got and m > 0:
        raise AssertionError("read(%d, ...) returned nothing" % frm)
    if len(got) < len(full) and len(got) < m and size + 15 + len(full[len(got)][4]) <= b:
        raise AssertionError("read(%d, %d, %d) stopped early" % (frm, m, b))


class _Model:
    """What the log should hold: the records appended and not yet seen gone,
    and counts of those gone (per class; those above the acked seq by seq)."""

    def __init__(self):
        self.held = {}  # seq -> (epoch, ts, type, body)
        self.missing = [0, 0, 0]
        self.gone = {}  # seq -> class, for gone records above the acked seq


def _check_consistent(lg, model, root, max_bytes):
    st = lg.stats()
    if st["bytes"] > max_bytes or st["bytes"] != seg_bytes_on_disk(root):
        raise AssertionError("bytes %d, on disk %d, max %d" % (st["bytes"], seg_bytes_on_disk(root), max_bytes))
    held = read_all(lg)
    prev = 0
    have = {}
    for seq, ep, ts, t, body in held:
        if seq <= prev or model.held.get(seq) != (ep, ts, t, body):
            raise AssertionError("record %d served wrong, out of order or back from the dead" % seq)
        prev = seq
        have[seq] = 1
    for seq in list(model.held):
        if seq not in have:
            c = cls_of(model.held.pop(seq)[2])
            model.missing[c] += 1
            model.gone[seq] = c
    unacked = [0, 0, 0]
    for seq in list(model.gone):
        if seq <= st["acked"]:
            del model.gone[seq]
        else:
            unacked[model.gone[seq]] += 1
    # missing records were acknowledged or dropped; dropped ones were counted
    names = ("dropped_readings", "dropped_events", "dropped_billing")
    for c in range(3):
        if not unacked[c] <= st[names[c]] <= model.missing[c]:
            raise AssertionError("%s %d: %d missing, %d of them unacked" % (names[c], st[names[c]], model.missing[c], unacked[c]))
    return held


def _check_append(lg, model, before, seq, max_bytes, root):
    held = _check_consistent(lg, model, root, max_bytes)
    st = lg.stats()
    # priority: an event is dropped only once no reading is left, a billing
    # record only once no event or reading is left (the new record aside)
    worst = -1
    if st["dropped_billing"] > before["dropped_billing"]:
        worst = 2
    elif st["dropped_events"] > before["dropped_events"]:
        worst = 1
    for r in held:
        if r[0] != seq and r[0] > st["acked"] and cls_of(r[3]) < worst:
            raise AssertionError("append %d dropped class %d while %d (type %d) was held" % (seq, worst, r[0], r[3]))


# ---------------------------------------------------------------- damage while running


def corrupt_while_open(root, seg_bytes, n, victim, offset):
    """Append n mixed records, then flip one byte (offset into the victim
    segment file, by index in name order) behind the open log's back; read
    everything twice and reboot."""
    lg = log.Log(root, 1, seg_bytes, 65536)
    while lg.next_seq <= n:
        append_next(lg, MIXED)
    path = root + "/log/" + seg_files(root)[victim]
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0x55
    with open(path, "wb") as f:
        f.write(data)
    first = survey_log(lg, MIXED)
    second = survey_log(lg, MIXED)
    after = append_next(lg, MIXED)
    lg.close()
    return {"first": first, "second": second, "appended": after, "reboot": survey(root, 2, seg_bytes, 65536, MIXED)}


# ---------------------------------------------------------------- crashes at every step


class Crash(Exception):
    pass


class _Faults:
    """Counts file system steps; raises Crash at step `at`. A crash at a
    write first writes half of the data (a torn write)."""

    def __init__(self, at):
        self.at = at
        self.n = 0
        self.hit = None
        self.files = []

    def step(self, what, f=None, data=None):
        self.n += 1
        if self.n != self.at:
            return
        self.hit = what
        if f is not None and len(data) > 1:
            f.write(bytes(data)[: len(data) // 2])
        raise Crash(what)


class _File:
    def __init__(self, faults, real):
        self._x = faults
        self._f = real

    def write(self, b):
        self._x.step("write", self._f, b)
        return self._f.write(b)

    def flush(self):
        self._x.step("flush")
        self._f.flush()

    def close(self):
        self._f.close()

    def read(self, *a):
        return self._f.read(*a)

    def readinto(self, b):
        return self._f.readinto(b)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self._f.close()


class _Os:
    def __init__(self, faults):
        self._x = faults

    def stat(self, p):
        return os.stat(p)

    def listdir(self, p):
        return os.listdir(p)

    def mkdir(self, p):
        self._x.step("mkdir")
        os.mkdir(p)

    def rename(self, a, b):
        self._x.step("rename " + a.split("/")[-1])
        os.rename(a, b)

    def remove(self, p):
        self._x.step("remove " + p.split("/")[-1])
        os.remove(p)


def _install(faults):
    def fopen(path, mode="r"):
        if "w" in mode or "a" in mode:
            faults.step("open " + path.split("/")[-1])
        real = open(path, mode)
        faults.files.append(real)
        return _File(faults, real)

    log.os = _Os(faults)
    log.open = fopen


def _uninstall(faults):
    log.os = os
    log.open = open
    for f in faults.files:
        try:
            f.close()
        except OSError:
            pass


def _copy_tree(src, dst):
    _rm_tree(dst)
    os.mkdir(dst)
    for name in os.listdir(src):
        s = src + "/" + name
        if os.stat(s)[0] & 0x4000:
            _copy_tree(s, dst + "/" + name)
        else:
            with open(s, "rb") as f:
                data = f.read()
            with open(dst + "/" + name, "wb") as f:
                f.write(data)


def _rm_tree(path):
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        p = path + "/" + name
        if os.stat(p)[0] & 0x4000:
            _rm_tree(p)
        else:
            os.remove(p)
    os.rmdir(path)


def crash_points(root, seg_bytes, max_bytes, n_pre, n_more, first_step, max_cases, garbage=0, report=None):
    """A full log of n_pre mixed records (pristine); then, for each step k
    from first_step: copy it, boot and append n_more records with a crash at
    the k-th file system step, reboot (with twice the room) and survey.
    Stops when a run no longer reaches step k, or after max_cases. With
    garbage, that many bad bytes end a segment in the middle of the log, so
    every boot first cuts them (and counts them, once, as lost). Returns
    {"base", "cases", "steps_without_crash"}; with report (a function, e.g.
    vgemit.emit) each case goes to it instead of into the list, to keep the
    heap small."""
    pristine = root + "/pristine"
    lg = log.Log(pristine, 1, seg_bytes, max_bytes)
    while lg.next_seq <= n_pre:
        append_next(lg, MIXED)
    lg.close()
    base = survey(pristine, 2, seg_bytes, max_bytes, MIXED)
    held = _runs_dict(base["runs"])
    if garbage:
        names = seg_files(pristine)
        with open(pristine + "/log/" + names[len(names) // 2], "ab") as f:
            f.write(b"\x07" * garbage)
    case = root + "/case"
    cases = []
    k = first_step
    while k < first_step + max_cases:
        _copy_tree(pristine, case)
        fx = _Faults(k)
        appended = []
        _install(fx)
        try:
            lg = log.Log(case, 3, seg_bytes, max_bytes)
            while len(appended) < n_more:
                appended.append(append_next(lg, MIXED))
        except Crash:
            pass
        finally:
            _uninstall(fx)
        if fx.hit is None:
            break
        left = [n for n in os.listdir(case + "/log") if n.endswith(".tmp") or n == "meta.new"]
        on_disk = seg_bytes_on_disk(case)
        # reboot with room to spare, so that its segment header thins nothing
        # (the append in flight would go unseen)
        sv = survey(case, 4, seg_bytes, 2 * max_bytes, MIXED)
        sv["bytes_on_disk"] = seg_bytes_on_disk(case)
        sv["bytes_after_crash"] = on_disk
        _against(sv, held)
        one = {"k": k, "hit": fx.hit, "left": left, "appended": appended, "survey": sv}
        if report is None:
            cases.append(one)
        else:
            report(one)
        k += 1
    return {"base": base, "cases": cases, "steps_without_crash": k}


def _runs_dict(runs):
    out = {}
    for first, last, ep in runs:
        s = first
        while s <= last:
            out[s] = ep
            s += 1
    return out


def _against(sv, held):
    # Keep the reply small: the survey's records as a difference from `held`.
    got = _runs_dict(sv.pop("runs"))
    sv["gone"] = [s for s in held if s not in got]
    sv["gone"].sort()
    sv["extra"] = [[s, got[s]] for s in got if s not in held]
    sv["extra"].sort()
    sv["moved"] = [s for s in got if s in held and got[s] != held[s]]


# ---------------------------------------------------------------- the power-cut subject


def main(argv):
    root = argv[2]
    epoch = int(argv[3])
    seg_bytes = int(argv[4])
    max_bytes = int(argv[5])
    mix = argv[6]
    ack_every = int(argv[7])
    lg = log.Log(root, epoch, seg_bytes, max_bytes)
    sv = survey_log(lg, mix)
    sv["bytes_on_disk"] = seg_bytes_on_disk(root)
    print("B" + json.dumps(sv))
    while True:
        seq = append_next(lg, mix)
        print(seq)
        if ack_every and seq % ack_every == 0:
            print("a%d" % lg.ack(seq - ack_every // 2))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "append":
    main(sys.argv)
