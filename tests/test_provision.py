"""`voltgate provision` from scratch and again: esptool flashes the firmware
image and the NVS partition to the mock ESP32 ROM bootloader and verifies
them; mpremote uploads the .mpy firmware to a `voltgate sim` board over
TCP; the board boots from that upload, reads its key, and accepts a permit
the server issues while refusing one for another device. A second run
changes nothing; a run cut mid-upload is finished by the next one; a key
rotation reaches board and registry together.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import serial

from techkit import Proxy, esp_image, mock_rom, run_cli
from voltgate import flashing, keys, nvs, permits, provision, tree, wire
from voltgate.link import Board
from voltgate.serlink import SerialTransport
from voltgate.simboard import SimulatedBoard

ROOT = tree.root()
OUTLET = ROOT / "boards" / "sim-outlet-2.json"
SITE = "depot"


@pytest.fixture
def sims():
    started: list[SimulatedBoard] = []

    def start(flash: Path, board: Path = OUTLET, **kw) -> SimulatedBoard:
        kw.setdefault("tcp_port", 0)
        s = SimulatedBoard(board, flash, log=flash.parent / (flash.name + ".console"), **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def env(tmp_path):
    """Paths of one technician's laptop: keystore (outside the repo), database, broker folder."""
    return {
        "keystore": tmp_path / "home" / ".voltgate" / "master.key",
        "db": f"sqlite:///{tmp_path / 'server.sqlite'}",
        "broker": tmp_path / "broker",
    }


def code_files(flash: Path) -> dict[str, str]:
    """What provisioning wrote (the firmware's own /data changes as it runs)."""
    return {p.relative_to(flash).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in flash.rglob("*") if p.is_file() and p.relative_to(flash).parts[0] != "data"}


@contextmanager
def link(sim: SimulatedBoard, device: str, key: bytes, version: int = 1):
    with SerialTransport(sim.url) as t:
        yield Board(t, device, key=key, key_version=version, timeout=2.0, retries=4)


def server(db: str):
    from voltgate.server import bootstrap

    eng, factory = bootstrap.open_database(db)
    return eng, factory


def server_permit(db: str, master: bytes, device: str, **kw) -> bytes:
    """A permit the management server issues (approval policy and all) for user alice."""
    from voltgate.server import db as vdb
    from voltgate.server import services
    from voltgate.server.models import Device, User

    eng, factory = server(db)
    try:
        with vdb.transaction(factory) as s:
            if s.get(User, "alice") is None:
                services.add_user(s, "alice")
                services.pay(s, "alice", 100_000, now=int(time.time()))
            if s.get(Device, device) is None:
                services.add_device(s, device, site_id=SITE, kind="outlet", board="sim-outlet-2", outlets=2)
            issued = services.request_permit(s, master, user_id="alice", device_id=device, action="power", now=int(time.time()), duration_s=1800, scope=kw.get("scope", [0]))
            return issued.token
    finally:
        eng.dispose()


def register(db: str, device: str) -> None:
    from voltgate.server import db as vdb
    from voltgate.server import services

    eng, factory = server(db)
    try:
        with vdb.transaction(factory) as s:
            services.add_device(s, device, site_id=SITE, kind="outlet", board="sim-outlet-2", outlets=2)
    finally:
        eng.dispose()


def registry_row(db: str, device: str) -> dict | None:
    return provision._registry_get(db, device)


def test_provision_a_simulated_board_from_scratch(sims, env, tmp_path, capsys):
    image = esp_image(tmp_path / "micropython-esp32.bin")
    flash = tmp_path / "flash"
    sim = sims(flash)
    register(env["db"], "ou-other")  # a board of the fleet already
    with mock_rom("esp32") as rom:
        argv = ["provision", OUTLET, "--port", sim.url, "--esptool-port", rom, "--firmware", image, "--site", SITE,
                "--keystore", env["keystore"], "--db", env["db"], "--broker-dir", env["broker"], "--json"]  # fmt: skip
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, err
        res = json.loads(out)
        dev = res["device"]
        assert re.fullmatch(r"ou-[0-9a-f]{12}", dev)  # from the chip's MAC (esptool read_mac on the mock)
        assert res["key_version"] == 1
        assert set(res["changed"]) == {"keystore", "flash", "upload", "identity", "registry", "broker"}
        steps = {s["step"]: s for s in res["steps"]}
        assert "firmware at 0x1000 written" in steps["flash"]["detail"] and "nvs at 0x9000 written" in steps["flash"]["detail"]

        # the keystore: made with mode 0600, its secret never printed
        assert env["keystore"].stat().st_mode & 0o777 == 0o600
        master = keys.load_master(env["keystore"])
        key = keys.derive_device_key(master, dev, 1)
        for secret in (master, key):
            assert secret.hex() not in out + err and secret.hex() not in sim.console().decode("latin-1")

        # esptool put both images on the chip: verified by MD5 on a fresh connection (the firmware
        # .bin's 0xFF gap over the NVS partition is left out of its write: NVS keeps the identity)
        part = nvs.partition(nvs.Identity(dev, key, 1, SITE).entries())
        fw = provision._around(flashing.Region(0x1000, image.read_bytes(), "firmware"), nvs.NVS_OFFSET, nvs.NVS_SIZE)
        assert [(r.address, len(r.data)) for r in fw] == [(0x1000, 0x8000), (0xF000, len(image.read_bytes()) - 0xE000)]
        with flashing.Chip.connect(rom, expect="esp32") as chip:
            chip.verify([*fw, flashing.Region(nvs.NVS_OFFSET, part, "nvs")])

        # the board boots from the upload: main.py (the stub) -> /vgmain.mpy and the other .mpy files
        assert sim.wait(lambda s: s.boots >= 2, 10)
        files = code_files(flash)
        assert (flash / "main.py").read_text() == provision.MAIN_STUB
        assert [f for f in files if f.endswith(".py")] == ["main.py"]
        assert {"vgmain.mpy", "permit.mpy", "outlet.mpy", "hal/sim.mpy", "lib/umqtt/simple.mpy", "board.json"} <= set(files)
        assert (flash / "board.json").read_bytes() == OUTLET.read_bytes()

        # ... reads its key (a time sync is MACed under it), and takes the server's permit, not another device's
        with link(sim, dev, key) as b:
            hello = b.hello()
            assert (hello["dev"], hello["site"], hello["fw"]) == (dev, SITE, "0.1.0")
            b.sync_time()
            mine = server_permit(env["db"], master, dev)
            other = server_permit(env["db"], master, "ou-other")
            assert b.present(other, 0)[0] == wire.BAD_MAC  # made under ou-other's key
            assert b.present(mine, 0) == [wire.OK, "outlet 0"]
            assert b.status()["app"][0][4] == "alice"  # the outlet is on for alice

        # the registry has it, and the broker files give it an account of its own
        assert registry_row(env["db"], dev) == {"site": SITE, "key_version": 1, "board": "sim-outlet-2", "kind": "outlet"}
        acl = (env["broker"] / "acl").read_text()
        assert f"user {dev}\ntopic write vg/{SITE}/{dev}/up" in acl
        assert (env["broker"] / "server-password").stat().st_mode & 0o777 == 0o600

        # again: nothing changes, on the chip, the board or the server
        before = code_files(flash)
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, err
        again = json.loads(out)
        assert again["device"] == dev and again["changed"] == []
        status = {s["step"]: s["status"] for s in again["steps"]}
        assert status["flash"] == status["upload"] == status["identity"] == status["registry"] == status["broker"] == "unchanged"
        assert code_files(flash) == before

    # and the code it runs is the upload, not the source tree
    from voltgate.repl import Repl

    assert sim.wait(lambda s: s.boots >= 3, 10)
    with Repl.open(sim.url) as r:
        assert r.eval("(__import__('permit').__file__, __import__('vgmain').__file__, __import__('sys').path)") == ("permit.mpy", "vgmain.mpy", ["", ".frozen", "/lib"])  # the flash root, not firmware/


class CutUpload(provision.Reporter):
    """Pulls the cable once the upload has sent `after` bytes."""

    def __init__(self, proxy: Proxy, after: int):
        self.proxy, self.after = proxy, after

    @contextmanager
    def progress(self, what, total):
        def seen(done):
            if what.startswith("upload") and done >= self.after and self.proxy is not None:
                self.proxy.cut()
                self.proxy = None

        yield seen


def test_a_run_cut_mid_upload_is_finished_by_running_again(sims, env, tmp_path, capsys):
    flash = tmp_path / "flash"
    sim = sims(flash)
    proxy = Proxy(sim.port)
    try:
        o = provision.Options(board_file=OUTLET, port=proxy.url, device_id="ou-cut", site=SITE, keystore=env["keystore"], db=env["db"])
        with pytest.raises(provision.StepError) as e:
            provision.run(o, CutUpload(proxy, 20_000))
        assert e.value.step == "upload" and e.value.exit_code == 3
        assert e.value.render("provision").startswith("voltgate: provision: upload: lost the REPL on socket://127.0.0.1:")
        assert "run the same command again" in e.value.hint
        assert not (flash / "main.py").exists()  # a half-uploaded board has no main.py: it does not boot into it
        assert registry_row(env["db"], "ou-cut") is None  # nor is it registered yet

        rc, out, err = run_cli(capsys, "provision", OUTLET, "--port", proxy.url, "--device-id", "ou-cut", "--site", SITE, "--keystore", env["keystore"], "--db", env["db"], "--json")
        assert rc == 0, err
        res = json.loads(out)
        assert {"upload", "identity", "registry"} <= set(res["changed"])
        written = int(re.match(r"(\d+) written", {s["step"]: s for s in res["steps"]}["upload"]["detail"]).group(1))
        assert 0 < written < len(code_files(flash))  # what the cut run had finished was left alone
        assert not list(flash.rglob("*.part"))

        rc, out, err = run_cli(capsys, "provision", OUTLET, "--port", proxy.url, "--device-id", "ou-cut", "--site", SITE, "--keystore", env["keystore"], "--db", env["db"], "--json")
        assert rc == 0 and json.loads(out)["changed"] == [], err
    finally:
        proxy.close()
    master = keys.load_master(env["keystore"])
    assert sim.wait(lambda s: s.boots >= 2, 10)
    with link(sim, "ou-cut", keys.derive_device_key(master, "ou-cut", 1)) as b:
        assert b.hello()["dev"] == "ou-cut"


def test_key_rotation_reaches_board_and_registry(sims, env, tmp_path, capsys, monkeypatch):
    flash = tmp_path / "flash"
    sim = sims(flash)
    base = ["provision", OUTLET, "--port", sim.url, "--device-id", "ou-rot", "--site", SITE, "--keystore", env["keystore"], "--db", env["db"], "--json"]
    rc, out, err = run_cli(capsys, *base)
    assert rc == 0, err
    master = keys.load_master(env["keystore"])
    k1 = keys.derive_device_key(master, "ou-rot", 1)
    k2 = keys.derive_device_key(master, "ou-rot", 2)
    now = int(time.time())

    # a rotation whose registry step fails: the board has version 2, the registry still 1
    real = provision._registry_put
    monkeypatch.setattr(provision, "_registry_put", lambda *a, **kw: (_ for _ in ()).throw(provision.VoltgateError("database is locked", "retry")))
    rc, out, err = run_cli(capsys, *base, "--rotate-key", "--overlap", "1h")
    assert rc == 1 and err.startswith("voltgate: provision: registry: database is locked (retry)")
    monkeypatch.setattr(provision, "_registry_put", real)
    assert registry_row(env["db"], "ou-rot")["key_version"] == 1
    rc, out, err = run_cli(capsys, *base)  # a plain run sees the half-done rotation and says how to finish it
    assert rc == 1 and "key version 2, the registry 1: a key rotation was interrupted" in err and "--rotate-key" in err

    rc, out, err = run_cli(capsys, *base, "--rotate-key", "--overlap", "1h")
    assert rc == 0, err
    res = json.loads(out)
    assert res["key_version"] == 2 and res["changed"] == ["registry"]  # the board had it already
    assert "finishing the rotation to version 2" in {s["step"]: s for s in res["steps"]}["key"]["detail"]
    assert registry_row(env["db"], "ou-rot")["key_version"] == 2
    rc, out, err = run_cli(capsys, *base)
    assert rc == 0 and json.loads(out)["changed"] == [], err  # and plain runs keep the rotation as it is

    old = permits.issue(k1, 1, device_id="ou-rot", user_id="bob", action="power", not_before=now - 60, expires=now + 4 * 3600, scope=[1])
    old2 = permits.issue(k1, 1, device_id="ou-rot", user_id="bob", action="power", not_before=now - 60, expires=now + 4 * 3600, scope=[1])
    assert sim.wait(lambda s: s.state == "main", 10)
    with link(sim, "ou-rot", k2, 2) as b:
        b.sync_time()
        assert b.present(server_permit(env["db"], master, "ou-rot"), 0)[0] == wire.OK  # the server issues under version 2
        assert b.present(old, 1)[0] == wire.OK  # version 1 still verifies within the overlap
        b.sync_time(now + 2 * 3600)  # past the overlap (1 h)
        assert b.present(old2, 1)[0] == wire.UNKNOWN_KEY
    with link(sim, "ou-rot", k1, 1) as b:
        with pytest.raises(Exception, match="unknown_key"):
            b.sync_time()  # commands take the current key only


def last(res):
    """(rc, stdout, the error line): the progress lines before it are not the error."""
    rc, out, err = res
    assert "Traceback" not in err
    return rc, out, err.strip().splitlines()[-1] if err.strip() else ""


def test_provision_errors_name_the_step(sims, env, tmp_path, capsys, monkeypatch):
    dead = "socket://127.0.0.1:1"  # nothing listens: the board has no MicroPython yet
    common = ["--keystore", env["keystore"], "--db", env["db"], "--site", SITE]

    bad = tmp_path / "sim-outlet-2.json"
    doc = json.loads(OUTLET.read_text())
    doc["outlets"][0]["relay"]["pin"] = 34  # input-only
    bad.write_text(json.dumps(doc))
    rc, out, err = run_cli(capsys, "provision", bad, "--port", dead, "--device-id", "ou-x", *common)
    # every problem, one per line
    assert rc == 2 and err.startswith("voltgate: provision: board: ") and "outlets[0].relay.pin: GPIO 34 is input-only" in err
    assert "(voltgate boards validate" in err and "Traceback" not in err
    assert not env["keystore"].exists()

    rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", dead, "--device-id", "ou-x", "--firmware", esp_image(tmp_path / "s3.bin", "esp32s3"), *common))
    assert rc == 2 and "voltgate: provision: flash: firmware image" in err and "is an image for another chip: it was built for esp32s3, the board file says esp32" in err

    with mock_rom("esp32s3") as rom:
        rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", dead, "--esptool-port", rom, "--device-id", "ou-x", "--firmware", esp_image(tmp_path / "e.bin"), *common))
    assert rc == 2 and f"voltgate: provision: flash: wrong chip on {rom}: it is an ESP32-S3, the board file says esp32" in err

    rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", dead, "--device-id", "ou-x", *common))
    assert rc == 3 and err.startswith("voltgate: provision: connect: cannot open socket://127.0.0.1:1")

    sim = sims(tmp_path / "flash", tcp_port=None)  # on a pty, where a port can be held
    with serial.Serial(sim.pty, exclusive=True):
        rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", sim.pty, "--device-id", "ou-x", *common))
    assert rc == 3 and f"voltgate: provision: connect: port {sim.pty} is busy" in err and "(close the program that holds the port" in err

    rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", sim.pty, *common))
    assert rc == 2 and "voltgate: provision: device: no device id, and a simulated board has no ROM bootloader" in err

    from voltgate import build

    monkeypatch.setattr(build, "mpy_cross_version", lambda: "6.2")
    rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", sim.pty, "--device-id", "ou-x", *common))
    assert rc == 2 and "voltgate: provision: upload: mpy version mismatch: the board's MicroPython 1.29.0 loads .mpy 6.3, this mpy-cross makes .mpy 6.2" in err
    monkeypatch.undo()

    rc, out, err = last(run_cli(capsys, "provision", OUTLET, "--port", sim.pty, "--device-id", "ou-x", "--site", SITE, "--db", env["db"], "--keystore", ROOT / "master.key"))
    assert rc == 2 and "the keystore" in err and "is inside the source tree" in err


def test_dry_run_prints_the_plan_and_touches_nothing(env, tmp_path, capsys):
    image = esp_image(tmp_path / "fw.bin")
    rc, out, err = run_cli(capsys, "provision", OUTLET, "--port", "socket://127.0.0.1:1", "--esptool-port", "socket://127.0.0.1:2", "--firmware", image,
                           "--site", SITE, "--keystore", env["keystore"], "--db", env["db"], "--broker-dir", env["broker"], "--dry-run")  # fmt: skip
    assert rc == 0, err
    assert out.strip() == "dry run: nothing was changed"
    for step in provision.STEPS:
        assert re.search(rf"^\S+ {step}\b", err, re.M), step
    assert "create " + str(env["keystore"]) in err and "ESP32 image" in err and "at 0x1000" in err and "0x9000" in err
    assert not env["keystore"].exists() and not env["broker"].exists() and not (tmp_path / "server.sqlite").exists()


def test_nvs_partition_is_blobs_and_i32_and_deterministic():
    ident = nvs.Identity("ou-1", bytes(range(32)), 3, SITE, {"host": "10.0.0.5", "port": 1883}, bytes(32), 2, 1_800_000_000)
    e = ident.entries()
    assert set(e) == {"dev_id", "key", "key_ver", "site", "link", "key_old", "key_old_v", "key_old_x"}
    assert all(isinstance(e[k], int) for k in nvs.INTS) and all(isinstance(v, bytes) for k, v in e.items() if k not in nvs.INTS)
    a, b = nvs.partition(e), nvs.partition(e)
    assert a == b and len(a) == nvs.NVS_SIZE
    # entry headers in the first page (32 bytes each after the page header and bitmap): byte 1 is
    # the type, bytes 8-24 the key. 0x01 u8 (the namespace), 0x14 i32, 0x42 blob data + 0x48 blob
    # index (NVS v2); never 0x21, a string, which esp32.NVS cannot read
    found: dict[str, set[int]] = {}
    for o in range(64, 4096, 32):
        name = a[o + 8 : o + 24].split(b"\0")[0].decode("ascii", "replace")
        if name in set(e) | {nvs.NAMESPACE}:
            found.setdefault(name, set()).add(a[o + 1])
    assert found == {nvs.NAMESPACE: {0x01}, **{k: ({0x14} if k in nvs.INTS else {0x42, 0x48}) for k in e}}


def test_keystore_is_never_created_in_the_repository(tmp_path):
    o = provision.Options(board_file=OUTLET, port="socket://127.0.0.1:1", device_id="ou-1", site=SITE, keystore=ROOT / "build" / "master.key", dry_run=True)
    with pytest.raises(provision.StepError) as e:
        provision.run(o)
    assert e.value.step == "keystore" and not (ROOT / "build" / "master.key").exists()


def test_nvs_code_for_an_esp32_round_trips_on_micropython():
    """What provisioning runs in an ESP32's REPL (esp32.NVS; here the tests' fake of it on the
    unix port): entries written, their digests read back, one erased."""
    import ast

    from voltgate import mpy

    e = nvs.Identity("ou-1", bytes(range(32)), 2, SITE, {"host": "10.0.0.5", "port": 1883}).entries()
    write, gone = nvs.diff(e, {})
    assert write == e and gone == []
    code = nvs.write_code("esp32", write, gone) + nvs.read_code("esp32") + nvs.write_code("esp32", {}, ["link"]) + nvs.read_code("esp32")
    res = mpy.run(code=code, path=[str(ROOT / "tests" / "mp" / "fake_esp32")])
    first, second = [ast.literal_eval(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert first == nvs.digests(e)
    assert second == nvs.digests({k: v for k, v in e.items() if k != "link"})
    assert nvs.diff(e, first) == ({}, [])
