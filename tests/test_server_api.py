"""The REST API over HTTP: uvicorn on a loopback port (started by the
fixture, stopped at teardown), httpx as the client, a SQLite file migrated
to head. Success paths for the user terminal and operators, and the 4xx
answers for bad input, each of which leaves the database as it was."""

import base64
import csv
import io
import os
import socket
import threading
import time

import httpx
import pytest
import qrcode
from PIL import Image
from sqlalchemy import select
from voltgate import keys, messages, permits, wire
from voltgate.server import api, db, models, services
from voltgate.server.store import ServerRecordStore

NOW = 1_768_467_600  # 2026-01-15 09:00 UTC
H = 3600
B1 = b"\xb1\x00\x00\x01"


class Server:
    def __init__(self, url, factory, master):
        self.url, self.factory, self.master = url, factory, master
        self.client = httpx.Client(base_url=url, timeout=10)

    def snapshot(self):
        with self.factory() as s:
            return {t.name: sorted(tuple(map(repr, row)) for row in s.execute(select(t))) for t in models.Base.metadata.sorted_tables}

    def feed(self, device, records):
        ServerRecordStore(self.factory).add(device, records)


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'api.sqlite'}"
    if hasattr(db, "upgrade"):
        db.upgrade(url)
    eng = db.engine(url)
    if not hasattr(db, "upgrade"):
        models.Base.metadata.create_all(eng)
    factory = db.sessions(eng)
    with db.transaction(factory) as s:
        services.add_device(s, "st-a", site_id="north", kind="station", board="station-4", slots=4)
        services.add_device(s, "st-b", site_id="south", kind="station", board="station-4", slots=4)
        services.add_device(s, "ou-1", site_id="north", kind="outlet", board="outlet-2", outlets=2, key_version=2)
        services.add_user(s, "alice")
        services.add_user(s, "bob")
        services.pay(s, "alice", 5_000, now=NOW - H)
    master = os.urandom(32)
    app = api.create_app(factory, master, now=lambda: NOW)
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:  # uvicorn sets started once it serves
        thread.join(0.02)
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
    s = Server(f"http://127.0.0.1:{sock.getsockname()[1]}", factory, master)
    assert s.client.get("/health").json()["ok"] is True
    yield s
    s.client.close()
    srv.should_exit = True
    thread.join(10)
    sock.close()
    eng.dispose()


def power(**kw):
    body = {"user_id": "alice", "device_id": "ou-1", "action": "power", "duration_s": H, "scope": [0]}
    body.update(kw)
    return body


def qr_matrix(png: bytes):
    img = Image.open(io.BytesIO(png)).convert("L")
    n = img.size[0] // 4
    return [[img.getpixel((c * 4 + 2, r * 4 + 2)) < 128 for c in range(n)] for r in range(n)]


# ---------------------------------------------------------------- user terminal


def test_a_permit_comes_as_cose_bytes_base64url_and_a_qr_code(server):
    r = server.client.post("/api/v1/permits", json=power(max_wh=1500))
    assert r.status_code == 201, r.text
    p = r.json()
    token = bytes.fromhex(p["token_hex"])
    assert base64.urlsafe_b64decode(p["token_b64url"] + "=" * (-len(p["token_b64url"]) % 4)) == token
    assert (p["user_id"], p["device_id"], p["nbf"], p["exp"], p["max_wh"]) == ("alice", "ou-1", NOW, NOW + H, 1500)
    assert p["estimate"] == {"energy_mwh": 1_500_000, "energy_cents": 45, "fee_cents": 50}
    ctx = permits.CheckContext("ou-1", keys={keys.kid_for(2): keys.derive_device_key(server.master, "ou-1", 2)}, now=NOW + 10)
    v = permits.verify(token, ctx, wire.ACTION_POWER, 0)
    assert v.ok and permits.describe(v.claims)["cti"] == p["cti"]
    # the QR code is a PNG whose modules are those of the token's bytes
    png = base64.b64decode(p["qr_png_b64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and Image.open(io.BytesIO(png)).format == "PNG"
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=4)
    qr.add_data(token)
    qr.make(fit=True)
    assert qr_matrix(png) == qr.get_matrix()
    served = server.client.get(p["qr_png_url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png" and served.content == png
    got = server.client.get(f"/api/v1/permits/{p['cti']}").json()
    assert (got["user"], got["scope"], got["revoked_at"]) == ("alice", [0], None)
    mine = server.client.get("/api/v1/users/alice/permits", params={"live": True}).json()
    assert [x["cti"] for x in mine] == [p["cti"]]


def test_compact_permits_are_smaller(server):
    big = server.client.post("/api/v1/permits", json=power(scope=[0])).json()
    small = server.client.post("/api/v1/permits", json=power(scope=[1], compact=True)).json()
    assert len(small["token_hex"]) < len(big["token_hex"]) - 40


def test_my_rentals_sessions_balance_and_points(server):
    a, b, o = messages.Record, messages.Record, messages.Record
    server.feed("st-a", [a(1, 1, NOW, wire.LOG_BATTERY_OUT, [0, B1, 100, 98, "alice", None, 3, 0, None, None])])
    server.feed("st-b", [b(1, 1, NOW + H, wire.LOG_BATTERY_IN, [2, B1, 40, 97, None, None, None, None, None])])
    cti = b"\x01" * 8
    server.feed(
        "ou-1", [o(1, 1, NOW + 2 * H, wire.LOG_SESSION_END, [1, cti, "alice", NOW + H, NOW + 2 * H, 3600, 1_000_000, "exp", 1_000_000])]
    )
    c = server.client
    [rental] = c.get("/api/v1/users/alice/rentals").json()
    assert (rental["out_device"], rental["in_device"], rental["in_slot"], rental["open"]) == ("st-a", "st-b", 2, False)
    assert c.get("/api/v1/users/alice/rentals", params={"open": True}).json() == []
    [session] = c.get("/api/v1/users/alice/sessions").json()
    assert (session["device"], session["outlet"], session["permit"], session["energy_mwh"]) == ("ou-1", 1, cti.hex(), 1_000_000)
    bal = c.get("/api/v1/users/alice").json()
    # 300 Wh for the rental (9 c) and 1 kWh for the session (30 c) at the default 30 c/kWh
    assert (bal["balance"], bal["points"], bal["points_value"]) == (5_000 - 9 - 30, 0, 0)
    given = c.post(
        "/api/v1/energy",
        json={
            "user_id": "alice",
            "device_id": "ou-1",
            "direction": "given",
            "energy_mwh": 250_000,
            "start": NOW,
            "end": NOW + 60,
            "ref": "v2g-7",
        },
    )
    assert given.status_code == 201 and given.json()["points"] == 25
    assert c.get("/api/v1/users/alice").json()["points"] == 25
    ledger = c.get("/api/v1/users/alice/ledger").json()
    assert [e["kind"] for e in ledger] == ["payment", "energy_taken", "energy_taken", "energy_given"]


# ---------------------------------------------------------------- operators


def test_operator_views_of_devices_batteries_slots_alarms_and_readings(server):
    R = messages.Record
    server.feed(
        "st-a",
        [
            R(5, 1, NOW, wire.LOG_SLOT_READING, [1, 41000, 2000, 250]),
            R(5, 2, NOW + 60, wire.LOG_ALARM, [17, 1, 560]),
            R(5, 3, NOW + 61, wire.LOG_STATE, [1, 5, 17]),
            R(5, 4, NOW + 120, wire.LOG_BATTERY_IN, [3, B1, 70, 95, None, None, None, 40000, 250]),
        ],
    )
    c = server.client
    assert [d["id"] for d in c.get("/api/v1/devices").json()] == ["ou-1", "st-a", "st-b"]
    dev = c.get("/api/v1/devices/st-a").json()
    assert dev["kind"] == "station" and [(x["index"], x["state"], x["battery"]) for x in dev["slots"]][1:4] == [
        (1, "fault", None),
        (2, "unknown", None),
        (3, "unknown", B1.hex()),
    ]
    assert len(c.get("/api/v1/devices/ou-1").json()["outlets"]) == 2
    [bat] = c.get("/api/v1/batteries").json()
    assert (bat["id"], bat["device"], bat["slot"], bat["soc"], bat["soh"]) == (B1.hex(), "st-a", 3, 70, 95)
    assert c.get(f"/api/v1/batteries/{B1.hex()}").json()["slot"] == 3
    assert [x["device"] for x in c.get("/api/v1/slots", params={"device": "st-b"}).json()] == ["st-b"] * 4
    [alarm] = c.get("/api/v1/alarms").json()
    assert (alarm["type_name"], alarm["index"], alarm["body"]) == ("alarm", 1, [17, 1, 560])
    rows = c.get("/api/v1/readings", params={"device": "st-a", "index": 1}).json()
    assert [r["seq"] for r in rows] == [1, 2, 3]
    rows = c.get("/api/v1/readings", params={"type": "slot_reading,battery_in", "since": NOW + 1}).json()
    assert [r["type_name"] for r in rows] == ["battery_in"]
    rows = c.get("/api/v1/readings", params={"battery": B1.hex()}).json()
    assert [r["seq"] for r in rows] == [4]
    text = c.get("/api/v1/readings", params={"device": "st-a", "format": "csv"})
    assert text.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(text.text)))
    assert [x["type_name"] for x in lines] == ["slot_reading", "alarm", "state", "battery_in"] and lines[0]["body"] == "[1,41000,2000,250]"


def test_revoking_a_permit_and_a_user_queues_commands(server):
    c = server.client
    p1 = c.post("/api/v1/permits", json=power()).json()
    p2 = c.post("/api/v1/permits", json=power(device_id="st-a", action="rent", scope=None, duration_s=600)).json()
    r = c.post(f"/api/v1/permits/{p1['cti']}/revoke")
    assert r.status_code == 200
    [cmd] = r.json()["commands"]
    assert (cmd["device"], cmd["type"], cmd["body"]) == ("ou-1", wire.MSG_REVOKE, {"cti": {"hex": p1["cti"]}, "exp": NOW + H})
    assert c.post(f"/api/v1/permits/{p1['cti']}/revoke").json()["commands"] == []
    r = c.post("/api/v1/users/alice/revoke")
    assert r.json()["status"] == "suspended"
    assert [(x["device"], x["body"]) for x in r.json()["commands"]] == [("st-a", {"sub": "alice", "until": p2["exp"]})]
    refused = c.post("/api/v1/permits", json=power(scope=[1]))
    assert (refused.status_code, refused.json()["code"]) == (403, "user_inactive")


def test_ledger_verify_and_docs(server):
    c = server.client
    v = c.get("/api/v1/ledger/verify").json()
    assert v["ok"] and v["entries"] == 1 and v["problem"] is None
    from sqlalchemy import update

    with db.transaction(server.factory) as s:
        s.execute(update(models.LedgerEntry).where(models.LedgerEntry.seq == 1).values(amount=9))
    v = c.get("/api/v1/ledger/verify").json()
    assert not v["ok"] and v["problem"]["code"] == "altered" and v["problem"]["seq"] == 1
    docs = c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/api/v1/permits", "/api/v1/readings", "/api/v1/users/{user_id}/rentals", "/api/v1/permits/{cti}/revoke"} <= set(paths)


# ---------------------------------------------------------------- bad input: 4xx, a clear message, nothing changed

BAD = [
    ("post", "/api/v1/permits", power(device_id="ou-9"), 404, "unknown_device", "no device 'ou-9'"),
    ("post", "/api/v1/permits", power(user_id="carol"), 404, "unknown_user", "no user 'carol'"),
    ("post", "/api/v1/permits", power(duration_s=None, start=NOW + 100, end=NOW + 100), 422, "invalid", "end must be after start"),
    ("post", "/api/v1/permits", power(duration_s=None, start=NOW), 422, "invalid", "give either end or duration_s"),
    ("post", "/api/v1/permits", power(start=NOW - 3600), 422, "starts_too_early", "at most 5 min in the past"),
    ("post", "/api/v1/permits", power(duration_s=13 * H), 422, "window_too_long", "at most 12 h"),
    ("post", "/api/v1/permits", power(max_wh=-5), 422, "invalid", "max_wh: Input should be greater than or equal to 0"),
    ("post", "/api/v1/permits", power(scope=[7]), 422, "out_of_scope", "no outlet 7"),
    ("post", "/api/v1/permits", power(scope=[0, 0]), 422, "invalid", "scope names an index twice"),
    ("post", "/api/v1/permits", power(action="fly"), 422, "invalid", "action"),
    ("post", "/api/v1/permits", power(device_id="a/b"), 422, "invalid", "device_id"),
    ("post", "/api/v1/permits", power(colour="red"), 422, "invalid", "colour: Extra inputs are not permitted"),
    ("post", "/api/v1/permits", power(user_id="bob"), 402, "insufficient_funds", "this may cost"),
    ("post", "/api/v1/permits", power(action="rent"), 422, "wrong_action", "an outlet does not rent; ask for power or service"),
    (
        "post",
        "/api/v1/energy",
        {"user_id": "alice", "device_id": "ou-1", "direction": "given", "energy_mwh": -1, "start": NOW, "end": NOW, "ref": "x"},
        422,
        "invalid",
        "energy_mwh",
    ),
    (
        "post",
        "/api/v1/energy",
        {"user_id": "alice", "device_id": "ou-9", "direction": "taken", "energy_mwh": 1, "start": NOW, "end": NOW, "ref": "x"},
        404,
        "not_found",
        "no device 'ou-9'",
    ),
    (
        "post",
        "/api/v1/energy",
        {"user_id": "alice", "device_id": "ou-1", "direction": "taken", "energy_mwh": 1000, "start": 0, "end": 10**12, "ref": "x"},
        422,
        "invalid",
        "end",
    ),
    (
        "post",
        "/api/v1/energy",
        {"user_id": "alice", "device_id": "ou-1", "direction": "taken", "energy_mwh": 1000, "start": 0, "end": 400 * 86400, "ref": "x"},
        422,
        "invalid",
        "at most 366 days",
    ),
    ("post", "/api/v1/permits/00ff00ff00ff00ff/revoke", None, 404, "not_found", "no permit"),
    ("post", "/api/v1/users/carol/revoke", None, 404, "not_found", "no user 'carol'"),
    ("get", "/api/v1/users/carol/rentals", None, 404, "not_found", "no user 'carol'"),
    ("get", "/api/v1/devices/ou-9", None, 404, "not_found", "no device 'ou-9'"),
    ("get", "/api/v1/batteries/ffff", None, 404, "not_found", "no battery"),
    ("get", "/api/v1/readings?device=ou-9", None, 404, "not_found", "no device 'ou-9'"),
    ("get", "/api/v1/readings?type=sparkles", None, 422, "invalid", "unknown record type 'sparkles'"),
    ("get", "/api/v1/readings?since=-1", None, 422, "invalid", "since"),
    ("get", "/api/v1/readings?since=" + "9" * 30, None, 422, "invalid", "since"),
    ("get", "/api/v1/readings?index=" + "9" * 30, None, 422, "invalid", "index"),
    ("get", "/api/v1/readings?type=" + "9" * 30, None, 422, "invalid", "unknown record type"),
]


@pytest.mark.parametrize("method, path, body, status, code, words", BAD, ids=[f"{b[3]}-{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_clear_4xx_and_change_nothing(server, method, path, body, status, code, words):
    before = server.snapshot()
    r = server.client.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and words in r.json()["detail"], r.json()
    assert server.snapshot() == before


def test_an_overlapping_request_is_a_conflict(server):
    assert server.client.post("/api/v1/permits", json=power()).status_code == 201
    before = server.snapshot()
    r = server.client.post("/api/v1/permits", json=power(duration_s=600))
    assert (r.status_code, r.json()["code"]) == (409, "overlap")
    assert server.snapshot() == before


def test_oversized_bodies_are_refused_with_413(server):
    before = server.snapshot()
    big = power(user_id="alice", pad="x" * 20_000)
    r = server.client.post("/api/v1/permits", json=big)
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    assert "at most 16384" in r.json()["detail"]
    # without a Content-Length (chunked): cut off once past the limit
    chunks = (b"x" * 4096 for _ in range(8))
    r = httpx.post(server.url + "/api/v1/permits", content=chunks, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "over 16384" in r.json()["detail"]
    # a body just under the limit is read as usual (and here refused for its content)
    r = server.client.post("/api/v1/permits", json=power(note="y" * 15_000))
    assert r.status_code == 422 and "note" in r.json()["detail"]
    assert server.snapshot() == before


def test_a_report_ref_books_once_and_never_for_someone_else(server):
    body = {"user_id": "alice", "device_id": "ou-1", "direction": "taken", "energy_mwh": 1000, "start": NOW, "end": NOW + 60, "ref": "r-1"}
    assert server.client.post("/api/v1/energy", json=body).status_code == 201
    before = server.snapshot()
    assert server.client.post("/api/v1/energy", json=body).status_code == 201  # the same report again: nothing new
    assert server.snapshot() == before
    for other in ({**body, "user_id": "bob"}, {**body, "energy_mwh": 2000}, {**body, "direction": "given"}):
        r = server.client.post("/api/v1/energy", json=other)
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    assert server.snapshot() == before
