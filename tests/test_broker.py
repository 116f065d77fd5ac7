"""The broker side of the links (voltgate.broker) against the real Mosquitto,
with paho-mqtt clients standing in for the boards and the server.

Mosquitto refuses by not delivering: a publish the ACL forbids is acked
(MQTT 3.1.1) and dropped, a subscription to a forbidden topic is granted and
stays silent. So a refusal test sends a marker the same way right after the
forbidden message and asserts that the marker is the first thing to arrive.
"""

from __future__ import annotations

import base64
import os
import queue
import shutil
import socket
import stat
import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from voltgate import broker as vgbroker
from voltgate.broker import OFFLINE, Broker, BrokerConfig, topic
from voltgate.errors import VoltgateError

from techkit import wait_for

WAIT = 5.0  # seconds any expected event may take
SERVER_PW = "server-secret"
DEV1 = ("site-a", "dev-1", "pw-one")
DEV2 = ("site-a", "dev-2", "pw-two")
DEV3 = ("site-b", "dev-3", "pw-three")
REGISTRY = [DEV1, DEV2, DEV3]


class Peer:
    """A paho client whose callbacks feed queues; every wait has a timeout."""

    def __init__(self, b: Broker, user, password, *, client_id="", clean=True, will=None, protocol=mqtt.MQTTv311):
        kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, reconnect_on_failure=False, **kw)
        if user is not None:
            self.c.username_pw_set(user, password)
        if will:
            self.c.will_set(will, OFFLINE, qos=1, retain=True)
        self.b = b
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.pubacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, props: self.connacks.put((rc, flags))
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put((mid, rcs))
        self.c.on_publish = lambda c, u, mid, rc, props: self.pubacks.put((mid, rc))
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.c.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)

    def connect(self):
        """The CONNACK: (reason code, flags)."""
        self.c.connect(self.b.host, self.b.port, keepalive=60)
        self.c.loop_start()
        return self.connacks.get(timeout=WAIT)

    def subscribe(self, t, qos=1):
        _, mid = self.c.subscribe(t, qos)
        got, rcs = self.subacks.get(timeout=WAIT)
        assert got == mid
        return rcs

    def publish(self, t, payload, qos=1, retain=False):
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.c.publish(t, payload, qos, retain)
        while True:
            mid, rc = self.pubacks.get(timeout=WAIT)
            if mid == info.mid:
                return rc

    def next(self):
        return self.messages.get(timeout=WAIT)

    def close(self):
        """Graceful: DISCONNECT, so no last will. Returns once it is sent."""
        if self.c.is_connected():
            self.c.disconnect()
            self.disconnects.get(timeout=WAIT)
        self.c.loop_stop()

    def drop(self):
        """Ungraceful: the TCP connection ends without DISCONNECT (a board losing power)."""
        self.c.socket().shutdown(socket.SHUT_RDWR)
        self.disconnects.get(timeout=WAIT)
        self.c.loop_stop()
        self.c.socket() and self.c.socket().close()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def connect(b, user, password, **kw) -> Peer:
        p = Peer(b, user, password, **kw)
        made.append(p)
        rc, _ = p.connect()
        assert rc == 0, f"{user}: {rc}"
        return p

    yield connect
    for p in made:
        p.c.disconnect()
        p.c.loop_stop()


def server(b, peers, **kw):
    return peers(b, vgbroker.SERVER_USER, SERVER_PW, **kw)


def device(b, peers, dev, **kw):
    return peers(b, dev[1], dev[2], **kw)


def up(dev):
    return topic(dev[0], dev[1], "up")


def down(dev):
    return topic(dev[0], dev[1], "down")


def state(dev):
    return topic(dev[0], dev[1], "state")


def wait_log(b: Broker, text: str):
    """Wait (with a deadline) for a line in the broker's log."""
    wait_for(lambda: text in b.log.read_text(), f"{text!r} in {b.log}", WAIT, 0.01)


# -- password hashes -------------------------------------------------------

# written by `mosquitto_passwd -b` (Mosquitto 2.0.11) for alice / secret
ALICE = "$7$101$qos0kdbBlqBSECtM$5VXtH0zRsAmEWXyfDI8/A3h3ujsRMP7fGbE/DS0jvlHNmBtEvcgqRYtHYOGorh1olA6WG1qoR9CKMyKj7CCgIg=="


def test_hash_matches_mosquitto_passwd_byte_for_byte():
    assert vgbroker.hash_password("secret", salt=base64.b64decode("qos0kdbBlqBSECtM")) == ALICE
    assert vgbroker.verify_password("secret", ALICE)
    assert not vgbroker.verify_password("Secret", ALICE)


def test_hash_round_trip_with_fresh_salts():
    a, b = vgbroker.hash_password("pw"), vgbroker.hash_password("pw")
    assert a != b and a.startswith("$7$101$")
    assert vgbroker.verify_password("pw", a) and vgbroker.verify_password("pw", b)
    with pytest.raises(ValueError):
        vgbroker.verify_password("pw", "$6$abc$def")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_reads_a_file_mosquitto_passwd_wrote(tmp_path):
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "dev-1", "pw-one"], check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", str(f), "dev-2", "pw-two"], check=True, capture_output=True)
    users = vgbroker.parse_passwd(f.read_text())
    assert set(users) == {"dev-1", "dev-2"}
    assert vgbroker.verify_password("pw-one", users["dev-1"]) and vgbroker.verify_password("pw-two", users["dev-2"])
    assert not vgbroker.verify_password("pw-two", users["dev-1"])


# -- generated files -------------------------------------------------------


def test_generated_files(tmp_path):
    conf = BrokerConfig(tuple(REGISTRY), SERVER_PW, port=18830).write(tmp_path)
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600
    users = vgbroker.parse_passwd((tmp_path / "passwd").read_text())
    assert set(users) == {"voltgate-server", "dev-1", "dev-2", "dev-3"}
    assert vgbroker.verify_password("pw-three", users["dev-3"])
    lines = conf.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("listener")] == ["listener 18830 127.0.0.1"]
    assert "allow_anonymous false" in lines and "use_username_as_clientid true" in lines
    assert (tmp_path / "data").is_dir()


@pytest.mark.parametrize("bad", [("site/x", "dev"), ("site", "dev+"), ("site", "#"), ("site", ""), ("si te", "dev"), ("site", "dev\nuser x")])
def test_names_that_would_break_topics_or_files_are_refused(bad):
    with pytest.raises(VoltgateError):
        BrokerConfig(((*bad, "pw"),), SERVER_PW)


def test_a_device_id_is_one_account():
    with pytest.raises(VoltgateError, match="twice"):
        BrokerConfig((DEV1, ("site-b", "dev-1", "x")), SERVER_PW)
    with pytest.raises(VoltgateError, match="server"):
        BrokerConfig((("site-a", "voltgate-server", "x"),), SERVER_PW)


def test_missing_mosquitto_says_how_to_install(monkeypatch):
    monkeypatch.setattr(vgbroker.shutil, "which", lambda name: None)
    monkeypatch.setattr(vgbroker.os, "access", lambda path, mode: False)
    with pytest.raises(VoltgateError) as e:
        vgbroker.binary()
    assert e.value.hint == "make setup installs it" and e.value.exit_code == 3


# -- the running broker ----------------------------------------------------


def test_device_publishes_its_up_and_the_server_receives_it(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    assert b.host == "127.0.0.1" and b.running
    srv = server(b, peers)
    srv.subscribe("vg/+/+/up")
    d1 = device(b, peers, DEV1)
    assert d1.publish(up(DEV1), b"reading") == 0
    assert srv.next() == (up(DEV1), b"reading", False)


def test_a_device_cannot_publish_as_another(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    srv = server(b, peers)
    srv.subscribe("vg/+/+/up")
    srv.subscribe("vg/+/+/state")
    d1 = device(b, peers, DEV1)
    d1.subscribe(down(DEV1))
    # MQTT 3.1.1: each is acked (publish() waits for the PUBACK), then dropped
    d1.publish(up(DEV2), b"forged")
    d1.publish(up(DEV3), b"forged")
    d1.publish(state(DEV2), b"forged", retain=True)
    d1.publish(down(DEV1), b"forged")  # a board cannot write commands, not even its own
    d1.publish(up(DEV1), b"marker")
    srv.publish(down(DEV1), b"marker")
    assert srv.next() == (up(DEV1), b"marker", False)
    assert d1.next() == (down(DEV1), b"marker", False)
    # and no forged retained state is left for later subscribers
    late = server(b, peers, client_id="late")
    late.subscribe(state(DEV2))
    d2 = device(b, peers, DEV2)
    d2.publish(state(DEV2), b"online", retain=True)
    assert late.next() == (state(DEV2), b"online", False)


def test_mqtt5_gets_not_authorised_for_a_forged_publish(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    srv = server(b, peers)
    srv.subscribe("vg/+/+/up")
    d1 = device(b, peers, DEV1, protocol=mqtt.MQTTv5)
    assert d1.publish(up(DEV2), b"forged") == "Not authorized"
    assert d1.publish(up(DEV1), b"own") == "Success"  # "No matching subscribers" without srv
    assert srv.next() == (up(DEV1), b"own", False)


def test_a_device_reads_only_its_own_down(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    d1 = device(b, peers, DEV1)
    # Mosquitto 2.0 grants these; the ACL filters each message instead
    for t in (down(DEV2), down(DEV3), up(DEV2), "vg/#", "#"):
        d1.subscribe(t)
    d2 = device(b, peers, DEV2)
    d2.subscribe(down(DEV2))
    srv = server(b, peers)
    srv.publish(down(DEV2), b"for dev-2")
    srv.publish(down(DEV3), b"for dev-3")
    d2.publish(up(DEV2), b"dev-2 up")
    srv.publish(down(DEV1), b"for dev-1")
    assert d2.next() == (down(DEV2), b"for dev-2", False)
    assert d1.next() == (down(DEV1), b"for dev-1", False)


def test_the_server_writes_a_devices_down(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    d3 = device(b, peers, DEV3)
    d3.subscribe(down(DEV3))
    srv = server(b, peers)
    assert srv.publish(down(DEV3), b"unlock") == 0
    assert d3.next() == (down(DEV3), b"unlock", False)


def test_the_server_can_share_its_subscription_between_workers(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    # how several server workers would split the ups (DESIGN.md, scale-out)
    srv = server(b, peers)
    assert srv.subscribe("$share/ingest/vg/+/+/up")[0] == 1
    d1 = device(b, peers, DEV1)
    d1.publish(up(DEV1), b"batch")
    assert srv.next() == (up(DEV1), b"batch", False)


@pytest.mark.parametrize(
    "user, password",
    [("dev-1", "pw-two"), ("dev-1", ""), ("nobody", "pw-one"), ("voltgate-server", "pw-one"), (None, None)],
    ids=["wrong-password", "empty-password", "unknown-user", "server-with-device-password", "anonymous"],
)
def test_bad_credentials_are_refused(broker, user, password):
    # anonymous is refused twice over: allow_anonymous false, and
    # use_username_as_clientid refuses a client that gives no username
    b = broker(REGISTRY, SERVER_PW)
    p = Peer(b, user, password)
    try:
        rc, _ = p.connect()
        assert rc == "Not authorized"
    finally:
        p.c.loop_stop()


def test_the_client_id_is_the_username(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    first = device(b, peers, DEV1, client_id="chosen-by-board", clean=False)
    first.subscribe(down(DEV1))
    first.close()
    # another client id, same username: the broker finds the same session
    again = Peer(b, DEV1[1], DEV1[2], client_id="something-else", clean=False)
    try:
        rc, flags = again.connect()
        assert rc == 0 and flags.session_present
    finally:
        again.close()
    assert "as dev-1 (" in b.log.read_text() and "chosen-by-board" not in b.log.read_text()


def test_last_will_marks_a_dropped_device_offline(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    srv = server(b, peers)
    srv.subscribe(state(DEV1))
    d1 = device(b, peers, DEV1, will=state(DEV1))
    d1.publish(state(DEV1), b"online", retain=True)
    assert srv.next() == (state(DEV1), b"online", False)
    d1.drop()
    assert srv.next() == (state(DEV1), OFFLINE, False)
    # retained: a server that subscribes later sees it too
    later = server(b, peers, client_id="later")
    later.subscribe(state(DEV1))
    assert later.next() == (state(DEV1), OFFLINE, True)


def test_a_graceful_disconnect_sends_no_will(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    srv = server(b, peers)
    srv.subscribe("vg/+/+/state")
    d1 = device(b, peers, DEV1, will=state(DEV1))
    d1.close()
    d2 = device(b, peers, DEV2)
    d2.publish(state(DEV2), b"marker")
    assert srv.next() == (state(DEV2), b"marker", False)


def test_a_last_will_cannot_forge_another_devices_state(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    srv = server(b, peers)
    srv.subscribe("vg/+/+/state")
    d1 = device(b, peers, DEV1, will=state(DEV2))  # accepted at CONNECT, dropped when due
    d1.drop()
    wait_log(b, "Client dev-1 closed its connection.")  # the will is handled with the close
    d3 = device(b, peers, DEV3)
    d3.publish(state(DEV3), b"marker")
    assert srv.next() == (state(DEV3), b"marker", False)


def test_restart_on_the_same_directory_keeps_sessions_and_retained_state(broker, peers):
    b = broker(REGISTRY, SERVER_PW)
    port, directory = b.port, b.dir
    d1 = device(b, peers, DEV1, client_id="board", clean=False)
    d1.subscribe(down(DEV1))
    d1.publish(state(DEV1), b"online", retain=True)
    d1.close()
    srv = server(b, peers)
    assert srv.publish(down(DEV1), b"queued while offline") == 0
    srv.close()

    b.stop()
    assert not b.running and not _accepts(b.host, port)
    b.start()
    assert (b.port, b.dir) == (port, directory)

    d1 = device(b, peers, DEV1, client_id="board", clean=False)
    assert d1.next() == (down(DEV1), b"queued while offline", False)
    srv = server(b, peers)
    srv.subscribe(state(DEV1))
    assert srv.next() == (state(DEV1), b"online", True)


def test_a_taken_port_is_retried(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # answers TCP connects: only the log tells it is not mosquitto
    ports = iter([taken.getsockname()[1]])
    real = vgbroker.free_port
    monkeypatch.setattr(vgbroker, "free_port", lambda host: next(ports, None) or real(host))
    try:
        with Broker(BrokerConfig((DEV1,), SERVER_PW), tmp_path) as b:
            assert b.port != taken.getsockname()[1]
            assert "Address already in use" in (tmp_path / "mosquitto.log").read_text()
            p = Peer(b, DEV1[1], DEV1[2])
            assert p.connect()[0] == 0
            p.close()
    finally:
        taken.close()


def test_the_process_is_stopped_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with Broker(BrokerConfig((DEV1,), SERVER_PW), tmp_path) as b:
            proc = b.proc
            raise RuntimeError("test body failed")
    assert proc.poll() is not None and b.proc is None
    assert "terminating" in b.log.read_text()


def test_a_broken_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(BrokerConfig, "acl", lambda self: "topic\n")  # mosquitto rejects this file
    b = Broker(BrokerConfig((DEV1,), SERVER_PW), tmp_path)
    with pytest.raises(VoltgateError, match="mosquitto exited at start"):
        b.start()
    assert b.proc is None


def _accepts(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_files_stay_private(broker):
    b = broker([DEV1], SERVER_PW)
    assert stat.S_IMODE(os.stat(b.dir / "passwd").st_mode) == 0o600
    assert SERVER_PW not in (b.dir / "passwd").read_text() and DEV1[2] not in (b.dir / "passwd").read_text()
