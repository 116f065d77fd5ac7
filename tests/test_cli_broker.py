"""`voltgate broker config`: the broker files for a device list, with board
passwords derived from the master secret; a real Mosquitto started on them
lets a board in with its derived password and keeps it to its own topics."""

import json
import queue

import paho.mqtt.client as mqtt
import pytest

from voltgate import broker, cli, keys


@pytest.fixture
def registry(tmp_path):
    master = keys.create_master(tmp_path / "master.key")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device": "ou-1", "site": "s1"}, {"device": "st-1", "site": "s2", "key_version": 2}]))
    return master, devs, tmp_path / "master.key"


def run(*argv):
    return cli.main(list(argv))


def test_config_files_for_a_registry(registry, tmp_path, capsys):
    master, devs, ks = registry
    out = tmp_path / "b"
    assert run("broker", "config", "--devices", str(devs), "--keystore", str(ks), "--out", str(out), "--port", "1999") == 0
    printed = capsys.readouterr().out
    server_pw = (out / "server-password").read_text().strip()
    assert server_pw and server_pw not in printed
    assert (out / "passwd").stat().st_mode & 0o777 == 0o600
    assert (out / "server-password").stat().st_mode & 0o777 == 0o600
    hashes = broker.parse_passwd((out / "passwd").read_text())
    pw = keys.mqtt_password(keys.derive_device_key(master, "st-1", 2))
    assert broker.verify_password(pw, hashes["st-1"])
    assert not broker.verify_password(keys.mqtt_password(keys.derive_device_key(master, "st-1", 1)), hashes["st-1"])
    assert broker.verify_password(server_pw, hashes[broker.SERVER_USER])
    acl = (out / "acl").read_text()
    assert "topic write vg/s2/st-1/up" in acl and "topic read vg/s1/ou-1/down" in acl
    assert "listener 1999 127.0.0.1" in (out / "mosquitto.conf").read_text()
    # a second run keeps the server password (the server is configured with it)
    assert run("broker", "config", "--devices", str(devs), "--keystore", str(ks), "--out", str(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["ou-1", "st-1"]
    assert (out / "server-password").read_text().strip() == server_pw


def test_a_board_logs_in_with_its_derived_password(registry, tmp_path):
    master, devs, _ = registry
    config = broker.from_registry(json.loads(devs.read_text()), master, "srv")
    with broker.Broker(config, tmp_path / "run") as b:
        results = queue.Queue()

        def try_login(user, password):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
            c.username_pw_set(user, password)
            c.on_connect = lambda c, u, f, rc, p: results.put(rc.is_failure)
            c.connect(b.host, b.port)
            c.loop_start()
            try:
                return results.get(timeout=5)
            finally:
                c.loop_stop()
                c.disconnect()

        assert try_login("ou-1", keys.mqtt_password(keys.derive_device_key(master, "ou-1", 1))) is False
        assert try_login("ou-1", keys.mqtt_password(keys.derive_device_key(master, "st-1", 2))) is True


@pytest.mark.parametrize(
    "content, problem",
    [("{}", "must hold a JSON list"), ("[{\"site\": \"s\"}]", "bad registry entry"), ("[oops", "is not JSON")],
)
def test_bad_device_lists_are_refused_with_a_reason(registry, tmp_path, capsys, content, problem):
    _, devs, ks = registry
    devs.write_text(content)
    assert run("broker", "config", "--devices", str(devs), "--keystore", str(ks), "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert err.startswith("voltgate: broker config: ") and problem in err and "Traceback" not in err
