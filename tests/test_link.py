"""firmware/link.py on MicroPython (a simulated outlet board) against the
host's message layer (voltgate.messages, cbor2 + python-cwt): the request
set of SPEC.md section 3, log batches, and signed commands refused when
forged, replayed, stale or meant for another board."""

import itertools
import json

import cbor2
import pytest

from voltgate import keys, messages, tree, wire

import test_outlet as to

OTHER_KEY = keys.derive_device_key(bytes(range(32)), "ou-0002", 1)
_names = itertools.count()


class Board:
    def __init__(self, mp_worker, tmp_path, store=None):
        self._w = mp_worker
        self.name = f"l{next(_names)}"
        mp_worker.call("link_checks", "new", self.name, to.board_file(tmp_path), str(tmp_path / "flash"), store or to.STORE, {})
        self.rid = itertools.count(1)

    def __call__(self, fn, *args):
        return self._w.call("link_checks", fn, self.name, *args)

    def raw(self, req: bytes):
        out = self("handle", req.hex())
        return None if out is None else bytes.fromhex(out)

    def ask(self, mtype, body=None):
        rid = next(self.rid)
        reply = messages.parse(self.raw(messages.request(mtype, body, rid=rid)))
        assert reply.id == rid
        return messages.body_of(reply, mtype)

    def cmd(self, mtype, body=None, *, counter, key=to.KEY, device=to.DEVICE, expires=to.START + 600):
        rid = next(self.rid)
        req = messages.command(mtype, body, key=key, key_version=1, device=device, counter=counter, rid=rid, expires=expires)
        reply = messages.parse(self.raw(req))
        assert reply.id == rid
        return reply

    def outlet(self, fn, *args):
        return self._w.call("link_checks", "oc", self.name, fn, *args)

    def relay(self, i):
        return self.outlet("state")["outlets"][i]["relay"]

    def sync(self):
        nonce = self.ask(wire.MSG_HELLO)["nonce"]
        r = messages.parse(self.raw(messages.time_sync(to.START, nonce, key=to.KEY, key_version=1, rid=0)))
        assert not r.is_error

    def commands(self):
        return [r[3] for r in self.outlet("records", [wire.LOG_COMMAND])]


@pytest.fixture
def board(mp_worker, tmp_path):
    return Board(mp_worker, tmp_path)


def test_hello_says_who_the_board_is_and_where_its_log_stands(board):
    h = board.ask(wire.MSG_HELLO)
    assert h["dev"] == to.DEVICE and h["kind"] == "outlet" and h["fw"]
    assert isinstance(h["epoch"], int) and h["epoch"] > 0
    first, last, nxt, acked = h["log"]
    assert first == 1 and nxt == last + 1 and acked == 0
    assert h["dropped"] == [0, 0, 0]
    assert h["clock"][0] is False  # not synced yet
    assert isinstance(h["nonce"], bytes) and len(h["nonce"]) >= 8
    assert h["ctr"] == 0


def test_status_carries_the_apps_status(board):
    s = board.ask(wire.MSG_STATUS)
    assert len(s["app"]) == 2 and [o[0] for o in s["app"]] == [0, 0]


def test_time_sync_answers_one_of_the_last_two_hellos_nonces(board):
    first = board.ask(wire.MSG_HELLO)["nonce"]
    second = board.ask(wire.MSG_HELLO)["nonce"]
    board.ask(wire.MSG_HELLO)  # a third hello (a pull, another server): the first nonce is gone
    old = messages.parse(board.raw(messages.time_sync(to.START + 5, first, key=to.KEY, key_version=1, rid=1)))
    assert old.is_error and old.reason == wire.REPLAYED
    ok = messages.parse(board.raw(messages.time_sync(to.START + 5, second, key=to.KEY, key_version=1, rid=2)))
    assert messages.body_of(ok, wire.MSG_TIME_SYNC) == to.START + 5
    h = board.ask(wire.MSG_HELLO)
    assert h["clock"][0] is True
    again = messages.parse(board.raw(messages.time_sync(to.START + 9, second, key=to.KEY, key_version=1, rid=3)))
    assert again.reason == wire.REPLAYED  # a nonce answers one sync only


def test_a_log_batch_holds_exactly_the_records_of_the_log(board):
    board.sync()
    assert board.outlet("present", to.permit(), 0)[0] == wire.OK
    board.outlet("advance", 70_000)  # a minute of readings
    want = board.outlet("records")
    got = []
    frm = 1
    while True:
        reply = messages.parse(board.raw(messages.request(wire.MSG_GET_LOG, [frm, 5], rid=9)))
        assert reply.id == 9
        batch = messages.log_batch(reply)
        if not batch.records:
            break
        assert len(batch.records) <= 5
        got += batch.records
        frm = batch.records[-1].seq + 1
    assert batch.next_seq == frm
    assert [r.seq for r in got] == [w[0] for w in want]
    assert [(r.ts, r.type) for r in got] == [(w[1], w[2]) for w in want]
    assert [wire.json_form(r.body) for r in got] == [w[3] for w in want]
    assert len({r.epoch for r in got}) == 1


def test_batches_group_records_by_boot_epoch(board):
    board.outlet("advance", 2000)
    e1 = board.ask(wire.MSG_HELLO)["epoch"]
    board("reboot", False)
    e2 = board.ask(wire.MSG_HELLO)["epoch"]
    batch = messages.log_batch(messages.parse(board.raw(messages.request(wire.MSG_GET_LOG, [1], rid=1))))
    epochs = [r.epoch for r in batch.records]
    assert epochs[0] == e1 and epochs[-1] == e2 and e1 != e2
    assert epochs == sorted(epochs, key=[e1, e2].index)


def test_ack_is_a_signed_command_and_frees_the_log(board):
    last = board.ask(wire.MSG_HELLO)["log"][1]
    r = board.cmd(wire.MSG_ACK, last, counter=10)
    assert messages.body_of(r, wire.MSG_ACK) == last
    assert board("log_stats")["acked"] == last
    assert board.commands()[-1] == [wire.MSG_ACK, wire.OK, 10]
    assert board("store_ctr") == 10


@pytest.mark.parametrize(
    "case, reason",
    [
        ("forged", wire.BAD_MAC),
        ("replayed", wire.REPLAYED),
        ("older_counter", wire.REPLAYED),
        ("stale", wire.EXPIRED),
        ("other_device", wire.WRONG_AUDIENCE),
        ("unsigned", wire.BAD_MAC),
    ],
)
def test_a_bad_command_is_refused_logged_and_changes_nothing(board, case, reason):
    board.sync()
    assert board.outlet("present", to.permit(), 0)[0] == wire.OK
    board.outlet("advance", 1000)
    assert board.relay(0) is True
    assert messages.body_of(board.cmd(wire.MSG_CLEAR_FAULT, None, counter=100), wire.MSG_CLEAR_FAULT) is None
    if case == "forged":
        r = board.cmd(wire.MSG_RELAY_OFF, 0, counter=101, key=OTHER_KEY)
    elif case == "replayed":
        r = board.cmd(wire.MSG_RELAY_OFF, 0, counter=100)
    elif case == "older_counter":
        r = board.cmd(wire.MSG_RELAY_OFF, 0, counter=99)
    elif case == "stale":
        board.outlet("advance", 1000)
        r = board.cmd(wire.MSG_RELAY_OFF, 0, counter=101, expires=to.START - 1)
    elif case == "other_device":
        r = board.cmd(wire.MSG_RELAY_OFF, 0, counter=101, device="ou-0002")
    else:
        req = cbor2.dumps({wire.ENV_TYPE: wire.MSG_RELAY_OFF, wire.ENV_ID: 5, wire.ENV_BODY: 0})
        r = messages.parse(board.raw(req))
    assert r.is_error and r.reason == reason
    board.outlet("advance", 1000)
    assert board.relay(0) is True
    assert board("store_ctr") == 100
    if reason in (wire.BAD_MAC,):
        # no valid MAC: counted in hello, never written to the flash
        assert board.commands()[-1][:2] == [wire.MSG_CLEAR_FAULT, wire.OK]
        assert board.ask(wire.MSG_HELLO)["junk"] == 1
    else:
        assert board.commands()[-1][:2] == [wire.MSG_RELAY_OFF, reason]
    # and the genuine command still works
    ok = board.cmd(wire.MSG_RELAY_OFF, 0, counter=101)
    assert not ok.is_error
    board.outlet("advance", 1000)
    assert board.relay(0) is False


def test_a_retried_command_gets_its_reply_again_and_runs_once(board):
    rid = 41
    req = messages.command(wire.MSG_ACK, 3, key=to.KEY, key_version=1, device=to.DEVICE, counter=77, rid=rid, expires=to.START + 600)
    first = board.raw(req)
    n = len(board.commands())
    assert board.raw(req) == first  # the reply was lost: the same bytes again
    assert len(board.commands()) == n  # nothing ran or was logged twice
    other = board.cmd(wire.MSG_ACK, 4, counter=77)  # the same counter on another command is a replay
    assert other.reason == wire.REPLAYED


def test_the_counter_survives_a_reboot(board):
    assert not board.cmd(wire.MSG_CLEAR_FAULT, None, counter=500).is_error
    board("reboot", True)
    assert board.ask(wire.MSG_HELLO)["ctr"] == 500
    r = board.cmd(wire.MSG_CLEAR_FAULT, None, counter=500)
    assert r.is_error and r.reason == wire.REPLAYED


def test_revoke_over_the_link_ends_the_session(board):
    board.sync()
    tok = to.permit()
    assert board.outlet("present", tok, 0)[0] == wire.OK
    board.outlet("advance", 1000)
    r = board.cmd(wire.MSG_REVOKE, {"cti": bytes.fromhex(to.cti_of(tok)), "exp": to.START + 3600}, counter=7)
    assert not r.is_error
    board.outlet("advance", 6000)
    assert board.relay(0) is False


def test_present_over_the_link(board):
    board.sync()
    r = board.ask(wire.MSG_PRESENT, [bytes.fromhex(to.permit(scope=[1])), 1])
    assert r[0] == wire.OK
    board.outlet("advance", 1000)
    assert board.relay(1) is True
    again = board.ask(wire.MSG_PRESENT, bytes.fromhex(to.permit(device_id="ou-0002")))
    assert again[0] == wire.WRONG_AUDIENCE


def test_ping_echoes_and_unknowns_get_an_error(board):
    assert board.ask(wire.MSG_PING, b"x" * 40) == b"x" * 40
    # a request over 768 bytes is refused undecoded; a ping carries at most 256 bytes
    big = messages.parse(board.raw(messages.request(wire.MSG_PING, b"x" * 800, rid=2)))
    assert big.is_error and big.reason == wire.TOO_LARGE and big.id is None
    fat = messages.parse(board.raw(messages.request(wire.MSG_PING, b"x" * 300, rid=2)))
    assert fat.is_error and fat.reason == wire.MALFORMED and fat.id == 2
    odd = messages.parse(board.raw(cbor2.dumps({wire.ENV_TYPE: wire.MSG_PING, wire.ENV_ID: "x" * 600})))
    assert odd.is_error and odd.reason == wire.MALFORMED and odd.id is None
    wide = messages.parse(board.raw(cbor2.dumps({wire.ENV_TYPE: wire.MSG_HELLO, wire.ENV_ID: 1, wire.ENV_BODY: {i: i for i in range(150)}})))
    assert not wide.is_error  # a body a hello ignores costs nothing worse than its decoding
    for raw in (b"", b"\xff", cbor2.dumps([1, 2]), cbor2.dumps({wire.ENV_TYPE: 31, wire.ENV_ID: 3})):
        r = messages.parse(board.raw(raw))
        assert r.is_error and r.reason == wire.MALFORMED
    bad = messages.parse(board.raw(messages.request(wire.MSG_GET_LOG, ["x"], rid=4)))
    assert bad.is_error and bad.reason == wire.MALFORMED and bad.id == 4
    # a reply sent to a board is not answered
    assert board.raw(cbor2.dumps({wire.ENV_TYPE: wire.MSG_REPLY + 1, wire.ENV_ID: 1})) is None
    other = messages.parse(board.raw(messages.request(wire.MSG_PING, device="ou-0002", rid=5)))
    assert other.reason == wire.WRONG_AUDIENCE


def test_alarms_wait_in_the_outbox(board):
    board("outbox")
    board.sync()
    board.outlet("set_mains", 270_000)
    assert board.outlet("present", to.permit(), 0)[0] == wire.OK
    board.outlet("advance", 5000)
    sent = [messages.parse(bytes.fromhex(m)) for m in board("outbox")]
    assert sent and all(m.type == wire.MSG_ALARM for m in sent)
    alarms = [r for r in board.outlet("records", [wire.LOG_ALARM])]
    assert [m.body[0] for m in sent] == [a[0] for a in alarms]
    assert wire.json_form(sent[0].body[2]) == alarms[0][3]


VECTORS = json.loads((tree.vectors_dir() / "messages.json").read_text())


@pytest.fixture
def vectors_board(mp_worker, tmp_path):
    """A board named as the vectors file's requests name their device."""
    return Board(mp_worker, tmp_path, {**to.STORE, "dev_id": VECTORS["device"].encode().hex()})


@pytest.mark.parametrize("case", VECTORS["requests"], ids=lambda c: c["name"])
def test_the_board_answers_each_request_of_the_vectors_file(vectors_board, case):
    """protocol/vectors/messages.json's requests, as the host builds them,
    answered by the firmware's link on MicroPython: a reply of the request's
    type with its id (test_msgvectors only decodes them on the host)."""
    env = cbor2.loads(bytes.fromhex(case["request"]))
    reply = messages.parse(vectors_board.raw(bytes.fromhex(case["request"])))
    assert not reply.is_error, reply
    assert reply.type == wire.MSG_REPLY + env[wire.ENV_TYPE] and reply.id == env[wire.ENV_ID]
    if env[wire.ENV_TYPE] == wire.MSG_HELLO:
        assert reply.body["dev"] == VECTORS["device"]
