"""The operator commands on the server's database (`voltgate users`,
`tariffs`, `settings`, `devices`, `permits`, `ledger`): what they print on
success, and `voltgate: <command>: <problem> (<hint>)` with the documented
exit code, never a traceback, on failure."""

import json

import pytest
from sqlalchemy import delete, update
from voltgate import cli, keys, permits, wire
from voltgate.server import db, models

from techkit import vg


@pytest.fixture
def env(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    monkeypatch.setenv("VOLTGATE_DB", url)
    monkeypatch.delenv("VOLTGATE_KEYSTORE", raising=False)
    master = keys.create_master(tmp_path / "master.key")
    return {"url": url, "keystore": str(tmp_path / "master.key"), "master": master, "tmp": tmp_path}


def ok(capsys, *argv):
    code, out, err = vg(capsys, *argv)
    assert code == 0, err
    return out


def fails(capsys, code, *argv):
    got, out, err = vg(capsys, *argv)
    assert got == code, (out, err)
    command = " ".join(a for a in argv[:2])
    assert err.startswith(f"voltgate: {command}: "), err
    return err


def registry(capsys):
    ok(capsys, "devices", "add", "ou-1", "--site", "depot", "--kind", "outlet", "--board", "outlet-2", "--outlets", "2")
    ok(
        capsys,
        "devices",
        "add",
        "st-1",
        "--site",
        "depot",
        "--kind",
        "station",
        "--board",
        "station-8",
        "--slots",
        "8",
        "--key-version",
        "2",
    )
    ok(capsys, "users", "add", "alice", "--name", "Alice", "--balance", "2000")
    ok(capsys, "users", "add", "bob")


def test_users(env, capsys):
    assert ok(capsys, "users", "add", "alice", "--balance", "2000") == "added user alice (balance 2000 cents)\n"
    ok(capsys, "users", "add", "bob", "--name", "Bob")
    rows = json.loads(ok(capsys, "users", "list", "--json"))
    assert [(u["id"], u["balance"], u["status"]) for u in rows] == [("alice", 2000, "active"), ("bob", 0, "active")]
    text = ok(capsys, "users", "list")
    assert text.splitlines()[0].split() == ["USER", "NAME", "STATUS", "BALANCE", "POINTS"] and "Bob" in text
    assert "balance 1500 cents" in ok(capsys, "users", "pay", "bob", "1500")
    shown = ok(capsys, "users", "show", "bob")
    assert "balance 1500 cents, 0 points" in shown and "payment +1500 cents" in shown
    assert json.loads(ok(capsys, "users", "show", "alice", "--json"))["ledger"][0]["ref"] == "opening:alice"
    err = fails(capsys, 2, "users", "add", "alice")
    assert err == "voltgate: users add: user 'alice' exists already\n"
    err = fails(capsys, 2, "users", "show", "carol")
    assert err == "voltgate: users show: there is no user 'carol' (see `voltgate users list`)\n"
    fails(capsys, 2, "users", "pay", "bob", "0")


def test_devices(env, capsys):
    out = ok(capsys, "devices", "add", "st-1", "--site", "depot", "--kind", "station", "--board", "station-8", "--slots", "8")
    assert out == "added station st-1 at site depot (8 slots, key version 1)\n"
    ok(capsys, "devices", "add", "ou-1", "--site", "depot", "--kind", "outlet", "--board", "outlet-2", "--outlets", "2", "--fw", "0.3.1")
    assert "device ou-1 disabled" in ok(capsys, "devices", "disable", "ou-1")
    rows = json.loads(ok(capsys, "devices", "list", "--json"))
    assert [(d["id"], d["kind"], d["enabled"], d["fw_version"]) for d in rows] == [
        ("ou-1", "outlet", False, "0.3.1"),
        ("st-1", "station", True, None),
    ]
    assert ok(capsys, "devices", "list").splitlines()[0].split()[:4] == ["DEVICE", "SITE", "KIND", "BOARD"]
    err = fails(capsys, 2, "devices", "add", "bad/id", "--site", "s", "--kind", "outlet", "--board", "b")
    assert "invalid device id 'bad/id' (1-32 characters" in err
    assert "is registered already" in fails(capsys, 2, "devices", "add", "st-1", "--site", "s", "--kind", "station", "--board", "b")
    assert "a station has slots only" in fails(
        capsys, 2, "devices", "add", "st-2", "--site", "s", "--kind", "station", "--board", "b", "--outlets", "2"
    )
    assert "there is no device 'ou-9'" in fails(capsys, 2, "devices", "enable", "ou-9")


def test_tariffs_and_settings(env, capsys):
    assert (
        ok(capsys, "tariffs", "set", "day", "--cents-per-kwh", "30", "--from", "7", "--to", "22")
        == "tariff day: 30 cents/kWh from 07:00 to 22:00\n"
    )
    ok(capsys, "tariffs", "set", "night", "--cents-per-kwh", "12", "--from", "22", "--to", "7")
    ok(capsys, "tariffs", "set", "day", "--cents-per-kwh", "28", "--from", "7", "--to", "22")  # changed, not added
    listed = json.loads(ok(capsys, "tariffs", "list", "--json"))
    assert [(t["name"], t["cents_per_kwh"]) for t in listed["tariffs"]] == [("day", 28), ("night", 12)]
    assert "local time: UTC" in ok(capsys, "tariffs", "list")
    assert "the start hour must be 0..23" in fails(capsys, 2, "tariffs", "set", "odd", "--cents-per-kwh", "1", "--from", "25")
    assert ok(capsys, "settings", "set", "timezone", "Europe/Berlin") == 'timezone = "Europe/Berlin"\n'
    ok(capsys, "settings", "set", "grace_s", "null")
    values = json.loads(ok(capsys, "settings", "list", "--json"))
    assert values["timezone"] == "Europe/Berlin" and values["grace_s"] is None and values["max_window_s"] == 12 * 3600
    assert fails(capsys, 2, "settings", "set", "grace_s", "-1") == "voltgate: settings set: grace_s must not be negative\n"
    assert "unknown setting 'colour'" in fails(capsys, 2, "settings", "set", "colour", "1")
    assert "unknown timezone" in fails(capsys, 2, "settings", "set", "timezone", "Mars/Base")


def test_permits_request_list_and_revoke(env, capsys):
    registry(capsys)
    out_file = env["tmp"] / "permit.cbor"
    p = json.loads(ok(capsys, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", "--minutes", "60",
                      "--scope", "1", "--keystore", env["keystore"], "--out", str(out_file), "--json"))  # fmt: skip
    token = out_file.read_bytes()
    assert token.hex() == p["token_hex"] and p["exp"] - p["nbf"] == 3600 and p["scope"] == [1]
    ctx = permits.CheckContext("ou-1", keys={keys.kid_for(1): keys.derive_device_key(env["master"], "ou-1", 1)}, now=p["nbf"] + 5)
    assert permits.verify(token, ctx, wire.ACTION_POWER, 1).ok
    text = ok(
        capsys,
        "permits",
        "request",
        "--user",
        "alice",
        "--device",
        "st-1",
        "--action",
        "rent",
        "--minutes",
        "10",
        "--keystore",
        env["keystore"],
    )
    assert text.startswith("permit ") and " rent on st-1 for alice" in text and "token " in text
    rows = json.loads(ok(capsys, "permits", "list", "--json", "--live"))
    assert sorted((x["device"], x["action"]) for x in rows) == [("ou-1", "power"), ("st-1", "rent")]
    assert ok(capsys, "permits", "revoke", p["cti"]) == f"permit {p['cti']} revoked; revocation queued for 1 board: ou-1\n"
    assert len(json.loads(ok(capsys, "permits", "list", "--json", "--live"))) == 1
    assert ok(capsys, "permits", "revoke", "--user", "alice") == "user alice suspended; revocation queued for 1 board: st-1\n"
    with db.sessions(db.engine(env["url"]))() as s:
        cmds = s.query(models.PendingCommand).order_by(models.PendingCommand.id).all()
        assert [(c.device_id, c.type, sorted(c.body)) for c in cmds] == [
            ("ou-1", wire.MSG_REVOKE, ["cti", "exp"]),
            ("st-1", wire.MSG_REVOKE, ["sub", "until"]),
        ]


def test_permit_refusals_and_bad_input(env, capsys):
    registry(capsys)
    ks = ["--keystore", env["keystore"]]
    err = fails(capsys, 1, "permits", "request", "--user", "bob", "--device", "ou-1", "--action", "power", "--minutes", "60", *ks)
    assert err.startswith("voltgate: permits request: refused (insufficient_funds): this may cost 119 cents")
    err = fails(capsys, 1, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", "--minutes", "900", *ks)
    assert "refused (window_too_long): the window lasts 15 h; at most 12 h" in err
    err = fails(capsys, 1, "permits", "request", "--user", "alice", "--device", "ou-9", "--action", "power", "--minutes", "5", *ks)
    assert "refused (unknown_device): there is no device 'ou-9'" in err
    err = fails(capsys, 2, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", "--minutes", "5")
    assert err == "voltgate: permits request: permits request needs the master secret (give --keystore FILE or set VOLTGATE_KEYSTORE)\n"
    err = fails(capsys, 2, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", *ks)
    assert "give the window's end (either --end TIME or --minutes N)" in err
    err = fails(capsys, 2, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", "--end", "tomorrow", *ks)
    assert "bad --end 'tomorrow' (Unix seconds or ISO 8601" in err
    err = fails(
        capsys, 2, "permits", "request", "--user", "alice", "--device", "ou-1", "--action", "power", "--minutes", "5", "--scope", "a,b", *ks
    )
    assert "bad scope 'a,b'" in err
    assert "no master secret at" in fails(
        capsys,
        2,
        "permits",
        "request",
        "--user",
        "alice",
        "--device",
        "ou-1",
        "--action",
        "power",
        "--minutes",
        "5",
        "--keystore",
        "/nonexistent",
    )
    assert "revoke what?" in fails(capsys, 2, "permits", "revoke")
    assert "there is no permit" in fails(capsys, 2, "permits", "revoke", "00ff")
    assert json.loads(ok(capsys, "permits", "list", "--json")) == []  # nothing was issued


def test_ledger_verify_show_and_settle(env, capsys):
    registry(capsys)
    ok(capsys, "users", "pay", "bob", "300")
    ok(capsys, "users", "pay", "bob", "200")
    out = ok(capsys, "ledger", "verify")
    assert out.startswith("ledger ok: 3 entries, head 3:")
    head = out.split("head ")[1].split()[0]
    rows = json.loads(ok(capsys, "ledger", "show", "--json"))
    assert [(e["seq"], e["user"], e["amount"]) for e in rows] == [(1, "alice", 2000), (2, "bob", 300), (3, "bob", 200)]
    assert len(json.loads(ok(capsys, "ledger", "show", "--user", "bob", "--limit", "1", "--json"))) == 1
    assert json.loads(ok(capsys, "ledger", "settle", "--from", "0", "--to", "10", "--json")) == []
    eng = db.engine(env["url"])
    with db.transaction(db.sessions(eng)) as s:
        s.execute(update(models.LedgerEntry).where(models.LedgerEntry.seq == 2).values(amount=30_000))
    err = fails(capsys, 1, "ledger", "verify")
    assert err.startswith("voltgate: ledger verify: ledger altered at entry 2: entry 2 does not match its hash")
    assert json.loads(vg(capsys, "ledger", "verify", "--json")[1])["problem"]["code"] == "altered"
    with db.transaction(db.sessions(eng)) as s:
        s.execute(update(models.LedgerEntry).where(models.LedgerEntry.seq == 2).values(amount=300))
        s.execute(delete(models.LedgerEntry).where(models.LedgerEntry.seq == 3))
        s.execute(update(models.User).where(models.User.id == "bob").values(balance=300))
    assert ok(capsys, "ledger", "verify").startswith("ledger ok: 2 entries")  # a deleted tail hides from the chain alone ...
    err = fails(capsys, 1, "ledger", "verify", "--head", head)
    assert "ledger deleted at entry 3: the noted head, entry 3, is gone" in err  # ... but not from a noted head
    assert "bad --head" in fails(capsys, 2, "ledger", "verify", "--head", "3:zz")
    eng.dispose()
