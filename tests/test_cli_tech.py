"""The technician's commands against a provisioned simulated station (and,
for MQTT, an outlet behind a private Mosquitto): `voltgate board ...` and
`voltgate permit ...`, their output on success and their one-line errors.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from techkit import run_cli, vg
from voltgate import broker, keys, permits, provision, tree
from voltgate.permitview import b64url
from voltgate.simboard import SimulatedBoard

ROOT = tree.root()
STATION = ROOT / "boards" / "sim-station-4.json"
OUTLET = ROOT / "boards" / "sim-outlet-2.json"
SITE = "depot"


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    """Station st-1, provisioned on a simulated board (console on TCP), firmware running."""
    d = tmp_path_factory.mktemp("station")
    ks = d / "home" / "master.key"
    db = f"sqlite:///{d / 'server.sqlite'}"
    sim = SimulatedBoard(STATION, d / "flash", tcp_port=0, log=d / "console.log").start()
    try:
        provision.run(provision.Options(board_file=STATION, port=sim.url, device_id="st-1", site=SITE, keystore=ks, db=db))
        assert sim.wait(lambda s: s.boots >= 2 and s.state == "main", 10)
        yield SimpleNamespace(sim=sim, url=sim.url, ks=str(ks), db=db, master=keys.load_master(ks), dir=d)
    finally:
        sim.stop()


# The console test comes first: the console is in text mode until a link frame arrives, and
# goes back to it only after 10 s without one (protocol/SPEC.md 4).
def test_present_on_the_console_line(st, capsys, tmp_path):
    ret = tmp_path / "return.cbor"
    rc, out, err = vg(capsys, "permit", "issue", "--device", "st-1", "--user", "alice", "--action", "return", "--minutes", "30", "--exi", "600", "--keystore", st.ks, "--out", ret)
    assert rc == 0 and out.startswith("permit ") and f"written to {ret}" in out
    rc, out, err = vg(capsys, "board", "present", ret, "--port", st.url, "--console")
    assert (rc, out) == (0, "ok slot 2\n"), err  # the empty slot opens; the clock is not trusted yet: exi lets it through
    rc, out, err = vg(capsys, "board", "present", ret, "--port", st.url, "--console")
    assert rc == 1 and err == "voltgate: board present: the board answered: refused replayed\n"


def test_info_and_status(st, capsys):
    rc, out, err = vg(capsys, "board", "info", "--port", st.url)
    assert rc == 0, err
    assert out.startswith("st-1: station sim-station-4, firmware 0.1.0, site depot\n") and "  clock: not trusted" in out
    rc, out, err = vg(capsys, "board", "info", "--port", st.url, "--json")
    h = json.loads(out)
    assert (h["dev"], h["kind"], len(h["log"]), h["clock"][0]) == ("st-1", "station", 4, False)
    rc, out, err = vg(capsys, "board", "status", "--port", st.url)
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["SLOT", "STATE"] and [ln.split()[0] for ln in lines[2:]] == ["0", "1", "2", "3"]
    rc, out, err = vg(capsys, "board", "status", "--port", st.url, "--json")
    assert len(json.loads(out)["app"]) == 4


def test_signed_commands_need_the_right_key(st, capsys):
    rc, out, err = vg(capsys, "board", "time-sync", "--port", st.url)
    assert rc == 2 and err == "voltgate: board time-sync: a time sync is signed with the device key (give --keystore FILE (or set VOLTGATE_KEYSTORE))\n"
    rc, out, err = vg(capsys, "board", "time-sync", "--port", st.url, "--keystore", st.ks, "--key-version", "2")
    assert rc == 1 and err.startswith("voltgate: board time-sync: the board refused it: unknown_key") and "give --key-version" in err
    rc, out, err = vg(capsys, "board", "time-sync", "--port", st.url, "--keystore", st.ks, "--db", st.db)
    assert rc == 0 and out.startswith("st-1: clock set to ") and out.rstrip().endswith("(trusted)"), err
    rc, out, err = vg(capsys, "board", "clear-fault", "0", "--port", st.url, "--keystore", st.ks)
    assert rc == 1 and err.startswith("voltgate: board clear-fault: the board refused it: unavailable")  # no fault on slot 0


def test_unlock_with_a_service_permit_or_the_signed_command(st, capsys, tmp_path):
    svc = tmp_path / "svc.cbor"
    rc, out, err = vg(capsys, "permit", "issue", "--device", "st-1", "--user", "tech", "--action", "service", "--scope", "0", "--minutes", "10", "--keystore", st.ks, "--db", st.db, "--out", svc)
    assert rc == 0, err
    rc, out, err = vg(capsys, "board", "unlock", "0", "--permit", svc, "--port", st.url)
    assert (rc, out) == (0, "st-1: ok slot 0\n"), err
    rc, out, err = vg(capsys, "board", "unlock", "0", "--permit", svc, "--port", st.url)
    assert rc == 1 and err == "voltgate: board unlock: st-1 refused the service permit: replayed (a single-use permit already used)\n"
    rc, out, err = vg(capsys, "board", "unlock", "3", "--port", st.url, "--keystore", st.ks, "--json")
    assert rc == 0 and json.loads(out)["unlocked"] == 3, err


def test_present_over_the_link(st, capsys, tmp_path):
    other_master = bytes(range(32))
    token = permits.issue(keys.derive_device_key(other_master, "st-1", 1), 1, device_id="st-1", user_id="mallory", action="rent", not_before=int(time.time()) - 10, expires=int(time.time()) + 600)
    rc, out, err = vg(capsys, "board", "present", b64url(token), "--port", st.url)
    assert rc == 1 and err == "voltgate: board present: st-1 refused the permit: bad_mac (the MAC does not match: made under another key, or altered)\n"
    rc, out, err = vg(capsys, "board", "present", "not-a-permit!", "--port", st.url)
    assert rc == 2 and err.startswith("voltgate: board present: 'not-a-permit!' is not a permit file, nor hex or base64url")
    good = permits.issue(keys.derive_device_key(st.master, "st-1", 1), 1, device_id="st-1", user_id="bob", action="service", not_before=int(time.time()) - 10, expires=int(time.time()) + 600, scope=[1])
    rc, out, err = vg(capsys, "board", "present", good.hex(), "--port", st.url, "--index", "1", "--json")
    assert rc == 0 and json.loads(out) == {"device": "st-1", "reason": "ok", "ok": True, "detail": "slot 1"}, err


def test_log_pull_to_a_file_and_to_the_server(st, capsys, tmp_path):
    from voltgate.server.store import ServerRecordStore

    jl = tmp_path / "st-1.jsonl"
    rc, out, err = vg(capsys, "board", "log", "--port", st.url, "--out", jl)
    assert rc == 0, err
    n = int(out.split()[0])
    assert n > 5 and "(not acked: the board keeps them for the server)" in out
    rows = [json.loads(line) for line in jl.read_text().splitlines()]
    assert len(rows) == n and {r["device"] for r in rows} == {"st-1"} and rows[0]["seq"] == 1 and rows[0]["type"] == 32  # LOG_BOOT
    rc, out, err = vg(capsys, "board", "log", "--port", st.url, "--out", jl)
    assert rc == 0 and int(out.split()[0]) < 3, err  # only what the board logged meanwhile
    rc, out, err = vg(capsys, "board", "log", "--port", st.url, "--to-db", "--db", st.db, "--keystore", st.ks, "--json")
    assert rc == 0, err
    res = json.loads(out)["db"]
    assert res["new"] >= n and res["acked"] >= n
    store = ServerRecordStore.from_url(st.db)
    assert store.count("st-1") == res["new"]
    rc, out, err = vg(capsys, "board", "log", "--port", st.url)
    assert rc == 2 and err == "voltgate: board log: where to? (give --out FILE.jsonl and/or --to-db)\n"


@pytest.fixture
def silent_port():
    """A TCP port that takes connections and never answers (a board stuck in the REPL, a wrong port)."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns = []

    def accept():
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"socket://127.0.0.1:{srv.getsockname()[1]}"
    srv.shutdown(socket.SHUT_RDWR)  # wakes the accept()
    srv.close()
    for c in conns:
        c.close()
    t.join(5)


def test_board_errors(capsys, silent_port):
    rc, out, err = vg(capsys, "board", "info", "--port", silent_port, "--timeout", "0.2")
    assert rc == 3 and err.startswith(f"voltgate: board info: no answer from the board on {silent_port}") and "(is its firmware running?" in err
    rc, out, err = vg(capsys, "board", "info", "--port", "socket://127.0.0.1:1")
    assert rc == 3 and err.startswith("voltgate: board info: cannot open serial port socket://127.0.0.1:1")
    rc, out, err = vg(capsys, "board", "info")
    assert rc == 2 and err == "voltgate: board info: which board? (give --port PORT (serial) or --mqtt HOST:PORT with --device ID)\n"
    rc, out, err = vg(capsys, "board")
    assert rc == 2 and "SUBCOMMAND" in err


def test_permit_show_verify_qr(st, capsys, tmp_path):
    p = tmp_path / "p.cbor"
    rc, out, err = vg(capsys, "permit", "issue", "--device", "st-1", "--user", "alice", "--action", "rent", "--start", "2030-01-01T10:00+01:00", "--minutes", "90", "--keystore", st.ks, "--out", p, "--json")
    assert rc == 0, err
    issued = json.loads(out)
    rc, out, err = vg(capsys, "permit", "show", p, "--tz", "Europe/Berlin")
    assert rc == 0
    assert out.splitlines()[0] == f"permit {issued['cti']}: rent on st-1 for alice"
    assert "  window: 2030-01-01 10:00:00 CET to 2030-01-01 11:30:00 CET\n" in out
    assert "verdict: MAC not checked: give the keystore to verify it" in out
    rc, out, err = vg(capsys, "permit", "show", issued["token_b64url"], "--keystore", st.ks, "--json")
    view = json.loads(out)
    assert view["claims"]["aud"] == "st-1" and view["key_version"] == 1 and view["verdict"]["reason"] == "not_yet_valid"
    rc, out, err = vg(capsys, "permit", "verify", p, "--keystore", st.ks, "--action", "rent", "--now", "2030-01-01T10:30+01:00")
    assert (rc, out.split(" for ")[0]) == (0, "valid"), err
    rc, out, err = vg(capsys, "permit", "verify", p, "--keystore", st.ks, "--now", "2030-01-01T12:00+01:00")
    assert rc == 1 and out == "refused: expired (its window has ended)\n"
    other = tmp_path / "other.key"
    keys.create_master(other)
    rc, out, err = vg(capsys, "permit", "verify", p, "--keystore", other, "--now", "2030-01-01T10:30+01:00")
    assert rc == 1 and out.startswith("refused: bad_mac")
    rc, out, err = vg(capsys, "permit", "verify", p)
    assert rc == 2 and err == "voltgate: permit verify: this needs the master secret (give --keystore FILE or set VOLTGATE_KEYSTORE)\n"
    rc, out, err = vg(capsys, "permit", "show", "zz")
    assert rc == 2 and err == "voltgate: permit show: not a permit: not a COSE_Mac0 (tag 17) (expected a COSE_Mac0 (tag 17) CBOR token)\n"
    rc, out, err = vg(capsys, "permit", "show", "no such file.cbor")
    assert rc == 2 and err.startswith("voltgate: permit show: 'no such file.cbor' is not a permit file, nor hex or base64url")
    png = tmp_path / "p.png"
    rc, out, err = vg(capsys, "permit", "qr", p, "--out", png, "--json")
    assert rc == 0 and json.loads(out)["text"] == issued["token_b64url"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = vg(capsys, "permit", "issue", "--device", "st-1", "--user", "alice", "--action", "rent", "--keystore", st.ks)
    assert rc == 2 and err == "voltgate: permit issue: give the window's end (either --minutes N or --until TIME)\n"


def test_board_over_mqtt(tmp_path, capsys):
    """An outlet provisioned with link settings and a broker account: after the broker
    reloads the files provisioning rewrote, `voltgate board` reaches it through the broker."""
    from voltgate.mqttlink import MqttTransport

    port = broker.free_port()
    bdir = tmp_path / "broker"
    bdir.mkdir()
    (bdir / "server-password").write_text("server-pw\n")
    b = broker.Broker(broker.BrokerConfig((), "server-pw", port=port), bdir).start()  # the site's broker, no boards yet
    sim = None
    try:
        sim = SimulatedBoard(OUTLET, tmp_path / "flash", tcp_port=0).start()
        ks = tmp_path / "master.key"
        db = f"sqlite:///{tmp_path / 'server.sqlite'}"
        rc, out, err = vg(capsys, "provision", OUTLET, "--port", sim.url, "--device-id", "ou-m", "--site", SITE, "--mqtt", f"127.0.0.1:{port}",
                          "--keystore", ks, "--db", db, "--broker-dir", bdir, "--json")  # fmt: skip
        assert rc == 0 and "broker" in json.loads(out)["changed"], err
        assert "user ou-m" in (bdir / "acl").read_text()
        b.proc.send_signal(signal.SIGHUP)  # mosquitto reads passwd and acl again
        with MqttTransport("127.0.0.1", port, "voltgate-server", "server-pw") as t:
            assert t.wait_state("ou-m", True, 30)  # the board logged in with its own account
        rc, out, err = vg(capsys, "board", "info", "--mqtt", f"127.0.0.1:{port}", "--device", "ou-m", "--db", db,
                          "--broker-password-file", bdir / "server-password", "--keystore", ks)  # fmt: skip
        assert rc == 0 and out.startswith("ou-m: outlet sim-outlet-2, firmware 0.1.0, site depot"), err
        rc, out, err = vg(capsys, "board", "time-sync", "--mqtt", f"127.0.0.1:{port}", "--device", "ou-m", "--site", SITE,
                          "--broker-password-file", bdir / "server-password", "--keystore", ks)  # fmt: skip
        assert rc == 0 and "(trusted)" in out, err
        rc, out, err = vg(capsys, "board", "info", "--mqtt", f"127.0.0.1:{port}", "--broker-password-file", bdir / "server-password")
        assert rc == 2 and err == "voltgate: board info: on MQTT the device must be named (give --device ID)\n"
        # provisioning again without --mqtt keeps the board's link settings (and changes nothing)
        rc, out, err = vg(capsys, "provision", OUTLET, "--port", sim.url, "--device-id", "ou-m", "--keystore", ks, "--db", db, "--broker-dir", bdir, "--json")
        assert rc == 0 and json.loads(out)["changed"] == [], err
    finally:
        if sim is not None:
            sim.stop()
        b.stop()


def test_help_has_examples(capsys):
    for cmd in (["provision"], ["board"], ["permit"], ["sim"], ["board", "log"], ["permit", "qr"]):
        with pytest.raises(SystemExit):
            run_cli(capsys, *cmd, "--help")
        out = capsys.readouterr().out
        assert "example" in out, cmd


def test_keystore_default_is_outside_the_repo(monkeypatch):
    monkeypatch.delenv("VOLTGATE_KEYSTORE", raising=False)
    assert provision.default_keystore() == Path.home() / ".voltgate" / "master.key"
