"""The server's gateway end to end: a private Mosquitto (the broker
fixture), simulated outlets running the real firmware in real time
(host/voltgate/mpside/vgsim.py, as in test_mqtt_e2e.py) and
voltgate.server.gateway pulling their logs into the server's database.

- one gateway, SQLite: every record arrives once and equals the board's
  log, queued revocations are delivered, marked done and in force on the
  board, and the registry shows what the boards' hellos said;
- two `voltgate server` processes against one PostgreSQL and one Mosquitto,
  each under its own broker account, both pulling the same boards: every
  record stored once, and the records the two processes report as stored
  add up to what the database holds (none was booked twice).

A final pull without ack, after the gateways stopped, brings the database
level with what each board still holds, so that both can be compared
record by record."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import cbor2
import pytest
from sqlalchemy import select

from voltgate import keys, link, sync, wire
from voltgate.broker import SERVER_USER
from voltgate.mqttlink import MqttTransport
from voltgate.server import db, models
from voltgate.server.gateway import Gateway, json_to_cbor
from voltgate.server.store import ServerRecordStore

import test_outlet as to
from test_mqtt_e2e import DEV1, DEV2, KEY1, KEY2, SITE, SimBoard, fill_records, wait_for

MASTER = bytes(range(32))  # test_mqtt_e2e's device keys come from this master secret
SERVER_PW = "server-pw"
SERVER2 = ("voltgate-server-2", "server-pw-2")
WAIT = 60.0
STOP_WAIT = 30.0


def registry(url: str, pending=()) -> None:
    """The two outlets in the registry; pending: (device, type, JSON body) rows."""
    eng = db.engine(url)
    try:
        with db.transaction(db.sessions(eng)) as s:
            s.add(models.Site(id=SITE, name="test site"))
            s.flush()
            for d in (DEV1, DEV2):
                s.add(models.Device(id=d, site_id=SITE, kind="outlet", board="sim-outlet-2", key_version=1))
            s.flush()
            for device, mtype, body in pending:
                s.add(models.PendingCommand(device_id=device, type=mtype, body=body, created=int(time.time())))
    finally:
        eng.dispose()


def rows(url: str, q):
    eng = db.engine(url)
    try:
        with db.sessions(eng)() as s:
            return s.execute(q).all()
    finally:
        eng.dispose()


@pytest.fixture
def boards(broker, tmp_path, mp, firmware_build):
    """A broker for the two outlets (and two server accounts), and a factory
    for simulated boards; every board is killed at the end."""
    devices = [(SITE, DEV1, keys.mqtt_password(KEY1)), (SITE, DEV2, keys.mqtt_password(KEY2))]
    b = broker(devices, SERVER_PW, server_users=[SERVER2])
    made: list[SimBoard] = []

    class Boards:
        pass

    n = Boards()
    n.broker = b

    def board(device, key, **kw) -> SimBoard:
        kw.setdefault("speed", 1)  # the board's own timing: its clock keeps real time once synced
        sb = SimBoard(mp, firmware_build, tmp_path, device, key, b.port, **kw)
        made.append(sb)
        return sb

    n.board = board
    try:
        yield n
    finally:
        for sb in made:
            sb.kill()


def final_pull(b, url: str, devices) -> dict:
    """After the gateways: pull each board once more without ack, so the
    database holds everything the board still holds. New records per device."""
    store = ServerRecordStore.from_url(url)
    out = {}
    with MqttTransport(b.host, b.port, SERVER_USER, SERVER_PW, site_of={d: SITE for d in devices}) as t:
        for d, key in devices.items():
            assert t.wait_state(d, True, WAIT)
            out[d] = sync.pull(link.Board(t, d, key=key, timeout=5.0), store, ack=False).new
    return out


def check_equal_to_the_boards_logs(url: str, sb: SimBoard, device: str, filled: int) -> list:
    """The board's log, read back from its flash, is in the database record by
    record; the database has every seq from 1 (nothing lost to an ack) and
    the filled readings exactly once."""
    stored = ServerRecordStore.from_url(url).records(device)
    by_key = {(r.epoch, r.seq): r for r in stored}
    assert len(by_key) == len(stored)
    board_log = sb.records()
    assert board_log, "the board holds records"
    for s, e, ts, ty, body in board_log:
        r = by_key.get((e, s))
        assert r is not None, f"{device}: seq {s} of the board is not in the database"
        assert (r.ts, r.type, cbor2.dumps(r.body)) == (ts, ty, cbor2.dumps(cbor2.loads(body)))
    assert sorted(r.seq for r in stored) == list(range(1, len(stored) + 1)), "no seq missing, none twice"
    got = fill_records(stored)
    assert len(got) >= filled  # the filled ones and the board's own readings since
    assert [r.ts for r in got[:filled]] == [1_800_000_000 + i for i in range(filled)]
    return stored


# ---------------------------------------------------------------- one gateway, SQLite


def test_the_gateway_pulls_each_record_once_and_delivers_queued_revocations(boards, tmp_path):
    url = f"sqlite:///{tmp_path / 'server.sqlite'}"
    db.upgrade(url)
    now = int(time.time())
    cti = bytes.fromhex("0badc0ffee0ddf00")
    registry(
        url,
        pending=[
            (DEV1, wire.MSG_REVOKE, {"sub": "u9", "until": now + 3600}),
            (DEV2, wire.MSG_REVOKE, {"cti": {"hex": cti.hex()}, "exp": now + 3600}),
        ],
    )
    sb1 = boards.board(DEV1, KEY1, records=1200).start()
    sb2 = boards.board(DEV2, KEY2, records=300).start()
    processed: list = []
    eng = db.engine(url)
    factory = db.sessions(eng)
    store = ServerRecordStore(factory, process=lambda s, d, rs: processed.extend((d, r.epoch, r.seq) for r in rs))
    gw = Gateway(factory, MASTER, host=boards.broker.host, port=boards.broker.port, user=SERVER_USER, password=SERVER_PW,
                 interval=3600, refresh=3600, store=store)  # fmt: skip
    try:
        gw.start()  # both boards come online: each is pulled, clock-synced, then gets its command

        def done():
            got = rows(url, select(models.PendingCommand.device_id, models.PendingCommand.done_at, models.PendingCommand.result))
            return all(d is not None for _, d, _ in got) and got

        commands = wait_for(done, "both revocations to be delivered", WAIT)
        assert {(dev, res) for dev, _, res in commands} == {(DEV1, wire.OK), (DEV2, wire.OK)}
        assert gw.stats["time_syncs"] == 2  # both boards started untrusted
        assert store.count(DEV1) >= 1200 and store.count(DEV2) >= 300
        # the revocation is in force on the board: a permit for u9 is refused
        b = gw.board(DEV1)
        assert b.hello()["clock"][0] is True
        tok = bytes.fromhex(to.permit(now=int(time.time()), user_id="u9"))
        assert b.present(tok, 0)[0] == wire.REVOKED
        assert b.present(bytes.fromhex(to.permit(now=int(time.time()), user_id="u1")), 0)[0] == wire.OK
    finally:
        gw.stop()
        eng.dispose()
    devs = {d.id: d for (d,) in rows(url, select(models.Device))}
    for d in (DEV1, DEV2):
        assert devs[d].online is True and devs[d].fw_version and devs[d].epoch and devs[d].last_seen >= now
    # the database level with the boards, then the boards stopped and compared
    final = final_pull(boards.broker, url, {DEV1: KEY1, DEV2: KEY2})
    assert final[DEV1] >= 1  # at least the LOG_COMMAND of the revocation, written after the gateway's last pull
    sb1.kill()
    sb2.kill()
    stored1 = check_equal_to_the_boards_logs(url, sb1, DEV1, 1200)
    stored2 = check_equal_to_the_boards_logs(url, sb2, DEV2, 300)
    # the gateway's store booked each record it stored once (the final pull had its own store)
    assert len(processed) == len(set(processed)) == store.stored
    assert store.stored + sum(final.values()) == len(stored1) + len(stored2)
    # the board logged the revocations it accepted, and the session the u1 permit started
    cmds1 = [r.body for r in stored1 if r.type == wire.LOG_COMMAND]
    assert [wire.MSG_REVOKE, wire.OK] in [c[:2] for c in cmds1]
    assert [wire.MSG_REVOKE, wire.OK] in [c[:2] for c in (r.body for r in stored2 if r.type == wire.LOG_COMMAND)]
    assert any(r.type == wire.LOG_SESSION_START for r in stored1)


def test_pending_command_bodies_come_back_as_cbor_values():
    assert json_to_cbor({"cti": {"hex": "00ff"}, "exp": 5}) == {"cti": b"\x00\xff", "exp": 5}
    assert json_to_cbor([{"hex": ""}, {"hex": "01", "x": 1}, 3]) == [b"", {"hex": "01", "x": 1}, 3]


class FakeBoard:
    """Answers commands as told: OK, a refusal (BoardError) or no answer (LinkTimeout)."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.calls = []

    def command(self, mtype, body=None):
        self.calls.append((mtype, body))
        a = self.answers.pop(0) if self.answers else wire.OK
        if a == "timeout":
            raise link.LinkTimeout("no answer")
        if a != wire.OK:
            from voltgate.messages import BoardError

            raise BoardError(a)

    call = command


def queued(url):
    c = models.PendingCommand
    return rows(url, select(c.id, c.done_at, c.result).order_by(c.id))


def test_queued_commands_go_in_order_and_a_refusal_is_an_answer_but_silence_is_not(db_url):
    now = int(time.time())
    cti = "00112233"
    registry(db_url, pending=[
        (DEV1, wire.MSG_REVOKE, {"cti": {"hex": cti}, "exp": now + 60}),
        (DEV1, wire.MSG_RELAY_OFF, None),
        (DEV1, wire.MSG_CONFIG, {"reading_s": 30}),
        (DEV2, wire.MSG_RELAY_OFF, 1),
    ])  # fmt: skip
    eng = db.engine(db_url)
    gw = Gateway(db.sessions(eng), MASTER, port=1)  # not started: no broker needed
    try:
        fake = FakeBoard([wire.OK, wire.EXPIRED, "timeout"])
        assert gw.send_pending(DEV1, fake) == 2  # the third was not answered: it waits for the next pull
        assert fake.calls == [
            (wire.MSG_REVOKE, {"cti": bytes.fromhex(cti), "exp": now + 60}),  # bytes again, as the board wants them
            (wire.MSG_RELAY_OFF, None),
            (wire.MSG_CONFIG, {"reading_s": 30}),
        ]
        got = queued(db_url)
        assert [(r[2], r[1] is not None) for r in got] == [(wire.OK, True), (wire.EXPIRED, True), (None, False), (None, False)]
        again = FakeBoard()
        assert gw.send_pending(DEV1, again) == 1 and again.calls == [(wire.MSG_CONFIG, {"reading_s": 30})]
        assert queued(db_url)[2][2] == wire.OK and queued(db_url)[3][1] is None  # the other board's waits for it
    finally:
        eng.dispose()


def test_a_command_another_server_process_is_sending_is_left_to_it(pg_url):
    registry(pg_url, pending=[(DEV1, wire.MSG_RELAY_OFF, 0), (DEV1, wire.MSG_RELAY_OFF, 1)])
    eng = db.engine(pg_url)
    factory = db.sessions(eng)
    gw = Gateway(factory, MASTER, port=1)
    try:
        with db.transaction(factory) as other:  # another process, in the middle of sending the first
            first = other.scalars(select(models.PendingCommand).order_by(models.PendingCommand.id).limit(1).with_for_update()).one()
            fake = FakeBoard()
            assert gw.send_pending(DEV1, fake) == 0 and fake.calls == []  # not the second before the first either
            first.done_at, first.result = int(time.time()), wire.OK
        assert gw.send_pending(DEV1, fake) == 1 and fake.calls == [(wire.MSG_RELAY_OFF, 1)]
        assert [r[2] for r in queued(pg_url)] == [wire.OK, wire.OK]
    finally:
        eng.dispose()


# ---------------------------------------------------------------- two server processes, PostgreSQL


class ServerProcess:
    """`python -m voltgate.cli server` with its stderr in a file."""

    def __init__(self, tmp, name, url, broker, user, password, keystore):
        self.err = tmp / f"{name}.log"
        pw = tmp / f"{name}.password"
        pw.write_text(password + "\n")
        cmd = [
            sys.executable, "-m", "voltgate.cli", "server",
            "--db", url, "--broker", f"{broker.host}:{broker.port}",
            "--broker-user", user, "--broker-password-file", str(pw),
            "--keystore", str(keystore), "--http", "off", "--pull-interval", "1",
        ]  # fmt: skip
        with open(self.err, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.err.read_text(errors="replace")

    def ingested(self) -> bool:
        """A pull of this process stored something new."""
        assert self.proc.poll() is None, self.text()[-3000:]
        return bool(re.search(r"pulled \S+: [1-9]\d* new", self.text()))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def stored(self) -> int:
        m = re.search(r"stopped: \d+ pulls \(\d+ failed\), (\d+) records stored", self.text())
        assert m, self.text()[-3000:]
        return int(m.group(1))


def test_two_server_processes_against_one_postgresql_store_every_record_once(boards, pg_url, tmp_path):
    now = int(time.time())
    registry(pg_url, pending=[(DEV1, wire.MSG_REVOKE, {"sub": "u7", "until": now + 3600})])
    keystore = tmp_path / "master.key"
    fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(MASTER)
    n1, n2 = 2000, 1000
    sb1 = boards.board(DEV1, KEY1, records=n1).start()
    sb2 = boards.board(DEV2, KEY2, records=n2).start()
    servers = [
        ServerProcess(tmp_path, "server-1", pg_url, boards.broker, SERVER_USER, SERVER_PW, keystore),
        ServerProcess(tmp_path, "server-2", pg_url, boards.broker, *SERVER2, keystore),
    ]
    try:
        store = ServerRecordStore.from_url(pg_url)

        def all_in_and_both_ingested():
            return store.count(DEV1) >= n1 and store.count(DEV2) >= n2 and all(s.ingested() for s in servers)

        wait_for(all_in_and_both_ingested, "both servers to ingest and every filled record to be stored", 120)
        wait_for(lambda: rows(pg_url, select(models.PendingCommand.done_at))[0][0] is not None, "the revocation to be done", WAIT)
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0], [s.text()[-2000:] for s in servers]  # SIGTERM: a clean stop
    for s in servers:
        assert "Traceback" not in s.text(), s.text()[-3000:]
    [(done_at, result)] = rows(pg_url, select(models.PendingCommand.done_at, models.PendingCommand.result))
    assert done_at is not None and result == wire.OK
    final = final_pull(boards.broker, pg_url, {DEV1: KEY1, DEV2: KEY2})
    sb1.kill()
    sb2.kill()
    stored1 = check_equal_to_the_boards_logs(pg_url, sb1, DEV1, n1)
    stored2 = check_equal_to_the_boards_logs(pg_url, sb2, DEV2, n2)
    # what the two processes (and the final pull) each report as newly
    # stored adds up to the table: no record was stored, or booked, twice
    per_process = [s.stored() for s in servers]
    assert all(n > 0 for n in per_process), per_process
    assert sum(per_process) + sum(final.values()) == len(stored1) + len(stored2) == store.count()
    # the queued revocation went to the board once, whichever process sent it
    revokes = [r.body for r in stored1 if r.type == wire.LOG_COMMAND and r.body[0] == wire.MSG_REVOKE]
    assert [v[:2] for v in revokes] == [[wire.MSG_REVOKE, wire.OK]], revokes


# ---------------------------------------------------------------- the `voltgate server` command


def test_the_server_command_reports_what_is_missing_in_one_line(tmp_path, capsys, monkeypatch):
    from voltgate import cli
    from voltgate.broker import free_port

    monkeypatch.chdir(tmp_path)
    assert cli.main(["server", "--keystore", "nope.key"]) == 2
    assert capsys.readouterr().err.strip() == "voltgate: server: no master secret at nope.key (create one with provisioning)"
    keys.create_master(tmp_path / "master.key")
    assert cli.main(["server"]) == 2
    assert "voltgate: server: no broker password file at broker/server-password" in capsys.readouterr().err
    (tmp_path / "pw").write_text("secret\n")
    assert cli.main(["server", "--broker-password-file", "pw", "--broker", "nowhere"]) == 2
    assert "voltgate: server: bad broker address 'nowhere' (HOST:PORT" in capsys.readouterr().err
    port = free_port()
    assert cli.main(["server", "--broker-password-file", "pw", "--broker", f"127.0.0.1:{port}", "--http", "off"]) == 3
    err = capsys.readouterr().err
    assert f"voltgate: server: cannot reach the MQTT broker at 127.0.0.1:{port}" in err and "Traceback" not in err
    assert (tmp_path / "voltgate.sqlite").exists()  # the embedded default, migrated before the broker was tried
    assert cli.main(["server", "--broker-password-file", "pw", "--db", f"postgresql://vg@127.0.0.1:{port}/vg"]) == 3
    assert "voltgate: server: cannot open the database postgresql+psycopg://vg@127.0.0.1" in capsys.readouterr().err


def test_the_server_command_runs_until_sigint_and_stops_cleanly(broker, tmp_path):
    b = broker([(SITE, DEV1, keys.mqtt_password(KEY1))], SERVER_PW)
    keys.create_master(tmp_path / "master.key")
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "server-password").write_text(SERVER_PW + "\n")
    err = tmp_path / "server.log"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voltgate.cli", "server", "--broker", f"{b.host}:{b.port}", "--http", "127.0.0.1:0"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        running = re.compile(r"running: .*REST API (\S+)")
        line = wait_for(lambda: running.search(err.read_text()) or proc.poll() is not None, "the server to run", WAIT)
        assert proc.poll() is None, err.read_text()
        api = line.group(1)
        assert api.startswith("http://"), err.read_text()  # uvicorn answers on the port it printed
        import http.client

        host, port = api[len("http://") :].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", "/openapi.json")
        assert c.getresponse().status < 500
        c.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(STOP_WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert "stopping" in text and "stopped: 0 pulls (0 failed), 0 records stored" in text and "Traceback" not in text
    assert (tmp_path / "voltgate.sqlite").exists()
