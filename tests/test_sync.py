"""Pull sync (voltgate.sync) through voltgate.link.Board against the real
firmware link on MicroPython (a simulated outlet), over an in-process
transport that can lose and repeat messages: every record stored once, a
lost ack or a repeated batch stores nothing twice, gaps are reported. Then
sync.Puller's scheduling, with sync.pull replaced by a recorder."""

import collections
import random
import threading

import pytest

from voltgate import link, sync, wire

import test_link as tl
import test_outlet as to


class WorkerTransport:
    """Carries requests to link_checks.handle in the MicroPython worker.
    drop_req / drop_reply / dup_reply: probabilities of losing a request,
    losing a reply, and delivering a reply twice."""

    def __init__(self, board, seed=1, drop_req=0.0, drop_reply=0.0, dup_reply=0.0):
        self.board = board
        self.rng = random.Random(seed)
        self.p = (drop_req, drop_reply, dup_reply)
        self.inbox = collections.deque()
        self.lost = 0

    def send(self, device, payload):
        assert device == to.DEVICE
        if self.rng.random() < self.p[0]:
            self.lost += 1
            return
        out = self.board.raw(payload)
        if out is None:
            return
        if self.rng.random() < self.p[1]:
            self.lost += 1
            return
        self.inbox.append(out)
        if self.rng.random() < self.p[2]:
            self.inbox.append(out)

    def receive(self, device, timeout):
        return self.inbox.popleft() if self.inbox else None


@pytest.fixture
def board(mp_worker, tmp_path):
    b = tl.Board(mp_worker, tmp_path)
    b.sync()
    assert b.outlet("present", to.permit(expires=to.START + 86400), 0)[0] == wire.OK
    b.outlet("command", "relay_off", 0)  # an ended session: billing records too
    assert b.outlet("present", to.permit(expires=to.START + 86400, scope=[1]), 1)[0] == wire.OK
    b.outlet("advance", 400_000)  # readings every minute on one outlet
    return b


def client(transport, **kw):
    kw.setdefault("timeout", 0.01)  # the in-process transport answers at once or never
    kw.setdefault("clock", lambda: to.START + 600)
    return link.Board(transport, to.DEVICE, key=to.KEY, key_version=1, **kw)


def board_records(b):
    return [(r[0], r[1], r[2], r[3]) for r in b.outlet("records")]


def stored(store):
    return [(r.seq, r.ts, r.type, wire.json_form(r.body)) for r in store.records(to.DEVICE)]


def test_pull_stores_everything_acks_and_a_second_pull_finds_nothing(board, tmp_path):
    store = sync.RecordStore(tmp_path / "s.sqlite")
    want = board_records(board)
    seen = []
    res = sync.pull(client(WorkerTransport(board)), store, batch=16, progress=lambda a, b: seen.append((a, b)))
    assert res.new == len(want) and res.duplicates == 0 and not res.gaps
    assert stored(store) == want
    assert res.acked == want[-1][0] == board("log_stats")["acked"]
    assert seen and seen[-1][0] == want[-1][0]
    again = sync.pull(client(WorkerTransport(board)), store)
    # the ack's own LOG_COMMAND record is all that is new
    assert again.new == 1 and again.gaps == []
    assert [r.type for r in store.records(to.DEVICE)][-1] == wire.LOG_COMMAND


def test_a_lossy_line_stores_every_record_once(board, tmp_path):
    store = sync.RecordStore(tmp_path / "s.sqlite")
    want = board_records(board)
    t = WorkerTransport(board, seed=7, drop_req=0.2, drop_reply=0.2, dup_reply=0.3)
    c = client(t, retries=12)
    res = None
    for _ in range(5):  # a pull may still fail after its retries: the next one resumes
        try:
            res = sync.pull(c, store, batch=8)
            break
        except link.LinkTimeout:
            continue
    assert res is not None and t.lost > 5 and c.stats["stale"] > 0
    assert stored(store)[: len(want)] == want
    assert len({r.seq for r in store.records(to.DEVICE)}) == store.count(to.DEVICE)


def test_a_lost_ack_reply_stores_nothing_twice(board, tmp_path):
    store = sync.RecordStore(tmp_path / "s.sqlite")
    n = len(board_records(board))

    class LoseAcks(WorkerTransport):
        def send(self, device, payload):
            out = self.board.raw(payload)  # the board acts on it...
            import voltgate.messages as m

            if m.parse(out).type != wire.MSG_REPLY + wire.MSG_ACK:
                self.inbox.append(out)  # ...but the ack's reply never arrives

    with pytest.raises(link.LinkTimeout):
        sync.pull(client(LoseAcks(board), retries=1), store)
    assert store.count(to.DEVICE) == n
    res = sync.pull(client(WorkerTransport(board)), store)
    # the board ran the ack once (the retry resent the same token and got
    # the same reply back); its LOG_COMMAND record is all that is new
    assert res.new == 1 and res.duplicates == 0
    assert store.count(to.DEVICE) == n + 1


def test_records_freed_before_this_store_saw_them_are_a_reported_gap(board, tmp_path):
    a = sync.RecordStore(tmp_path / "a.sqlite")
    sync.pull(client(WorkerTransport(board)), a)
    board("reboot", False)  # a new segment: the acked one may go
    first = sync.pull(client(WorkerTransport(board)), a)
    board.outlet("advance", 120_000)
    b = sync.RecordStore(tmp_path / "b.sqlite")  # a second server that lost its database
    res = sync.pull(client(WorkerTransport(board)), b)
    assert res.gaps and res.gaps[0][0] == 1 and 1 < res.gaps[0][1] < first.acked
    assert b.gaps(to.DEVICE) == res.gaps


def test_a_command_behind_the_boards_counter_catches_up(board):
    c1 = client(WorkerTransport(board))
    c1.counter.raise_to(10**18)
    c1.ack(1)
    c2 = client(WorkerTransport(board))  # its counter is the time in µs: behind
    assert c2.ack(2) == 2
    assert c2.counter.next() > 10**18


# -- Puller: when pulls happen (sync.pull replaced by a recorder)


class Pulls:
    """Stands in for sync.pull: records each pull, can hold one device's
    pulls until released, and fails where told."""

    def __init__(self):
        self.cv = threading.Condition()
        self.done = collections.Counter()
        self.running = collections.Counter()
        self.most = 0  # the most pulls of one device at the same time
        self.hold = set()
        self.fail = {}

    def __call__(self, board, store, **kw):
        d = board
        with self.cv:
            self.running[d] += 1
            self.most = max(self.most, self.running[d])
            while d in self.hold:
                self.cv.wait()
        try:
            if d in self.fail:
                raise self.fail[d]
            return sync.PullResult(d, new=1)
        finally:
            with self.cv:
                self.running[d] -= 1
                self.done[d] += 1
                self.cv.notify_all()

    def release(self, d):
        with self.cv:
            self.hold.discard(d)
            self.cv.notify_all()

    def wait(self, cond, timeout=10.0):
        with self.cv:
            assert self.cv.wait_for(lambda: cond(self), timeout), dict(self.done)


@pytest.fixture
def pulls(monkeypatch):
    p = Pulls()
    monkeypatch.setattr(sync, "pull", p)
    return p


def puller(**kw):
    reports = []
    kw.setdefault("report", lambda d, r, e: reports.append((d, r, e)))
    pl = sync.Puller(lambda d: d, None, **kw)  # the "board" is its device id here
    pl.reports = reports
    return pl


def test_every_known_board_is_pulled_on_its_interval(pulls):
    with puller(interval=0.05) as pl:
        pl.add("a")
        pl.add("b", now=True)
        pulls.wait(lambda p: p.done["a"] >= 3 and p.done["b"] >= 3)
        pl.remove("b")
        n = pulls.done["b"]
        pulls.wait(lambda p: p.done["a"] >= n + 3)
    assert pulls.done["b"] <= n + 1  # one may have been under way
    assert all(r[1].new == 1 and r[2] is None for r in pl.reports)


def test_a_board_coming_online_is_pulled_at_once_and_offline_changes_nothing(pulls):
    with puller(interval=3600) as pl:
        pl.on_state("a", False)
        pl.on_state("b", True)
        pulls.wait(lambda p: p.done["b"] == 1)
        assert pulls.done["a"] == 0 and pl.devices == ["b"]


def test_one_pull_per_board_at_a_time_and_asks_meanwhile_make_one_more(pulls):
    pulls.hold.add("a")
    with puller(interval=3600) as pl:
        pl.pull_now("a")
        pulls.wait(lambda p: p.running["a"] == 1)
        for _ in range(5):
            pl.pull_now("a")
        pl.pull_now("b")  # other boards go on meanwhile
        pulls.wait(lambda p: p.done["b"] == 1)
        pulls.release("a")
        pulls.wait(lambda p: p.done["a"] == 2)
    assert pulls.most == 1 and pulls.done["a"] == 2


def test_a_failed_pull_is_reported_and_the_board_stays_scheduled(pulls):
    pulls.fail["a"] = link.LinkTimeout("a: no answer")
    with puller(interval=0.05) as pl:
        pl.add("a", now=True)
        pulls.wait(lambda p: p.done["a"] >= 2)
    errors = [e for d, r, e in pl.reports if d == "a"]
    assert errors and all(isinstance(e, link.LinkTimeout) for e in errors)


def test_stop_ends_the_scheduling(pulls):
    pl = puller(interval=0.01).start()
    pl.add("a", now=True)
    pulls.wait(lambda p: p.done["a"] >= 1)
    pl.stop(timeout=5)
    n = pulls.done["a"]
    assert not pl._thread.is_alive()
    pl.pull_now("a")
    with pulls.cv:
        assert not pulls.cv.wait_for(lambda: pulls.done["a"] > n, 0.2)


def test_a_board_whose_log_starts_again_is_followed_from_its_start(mp_worker, tmp_path, board):
    store = sync.RecordStore(tmp_path / "s.sqlite")
    first = sync.pull(client(WorkerTransport(board)), store)
    old = first.received
    # the same device id with an erased flash (or a replaced board): seqs from 1
    # again, under new boot epochs, and more of them than the store holds
    (tmp_path / "replaced").mkdir()
    fresh = tl.Board(mp_worker, tmp_path / "replaced")
    fresh.sync()
    assert fresh.outlet("present", to.permit(expires=to.START + 86400), 0)[0] == wire.OK
    fresh.outlet("advance", 3_000_000)
    want = board_records(fresh)
    assert len(want) > old
    later = lambda: to.START + 10_000  # noqa: E731 (the fresh board's time has moved on)
    res = sync.pull(client(WorkerTransport(fresh), clock=later), store)
    assert res.restarted and not res.gaps
    assert res.new == len(want)  # from seq 1, not from where the old log ended
    mine = {(r.epoch, r.seq) for r in store.records(to.DEVICE)}
    assert len(mine) == old + len(want)  # both logs, each record once
    # the next pull follows the new log: nothing skipped, no restart again
    fresh.outlet("advance", 600_000)
    again = sync.pull(client(WorkerTransport(fresh), clock=later), store)
    assert not again.restarted and not again.gaps and again.new > 1
    # the position is the last record pulled (only the ack's own record follows it)
    assert store.position(to.DEVICE)[0] == [r[0] for r in board_records(fresh)][-1] - 1
