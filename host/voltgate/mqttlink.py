"""The server's side of the MQTT link: a transport for voltgate.link.Board.

One paho-mqtt client (MQTT 3.1.1, QoS 1) for every board behind a broker
(DESIGN.md, Links; protocol/SPEC.md 3.1):

    send(device, payload)      publishes a request to vg/<site>/<device>/down
    receive(device, timeout)   the device's next message from .../up, or None

It subscribes to vg/+/+/up and vg/+/+/state; messages from up wait in a
bounded queue per device (the oldest goes when it is full, counted in
stats["dropped"]), and the retained state topic says whether a board is
online ("online" when it connects, "offline" from its last will), reported
to on_state(device, online) from paho's network thread: on_state must not
block (voltgate.sync.Puller.on_state only schedules a pull). A request made
while the broker is unreachable is not queued for later (a stale command
could arrive after its retry): it is dropped and counted, and the caller
times out and retries. paho reconnects by itself; the subscriptions are
made again on every connect.

    with MqttTransport("127.0.0.1", 1883, "voltgate-server", pw, site_of={"ou-0001": "depot"}) as t:
        board = link.Board(t, "ou-0001", key=k)
        board.hello()

site_of maps a device id to its site (a dict or a callable); a device it
does not know is looked up in the sites seen on its own up/state topics.

shared="<group>" subscribes to $share/<group>/vg/+/+/up, so that several
server processes split the boards' messages (DESIGN.md, scale-out). A reply
then reaches one of them, not necessarily the one that asked: use it for
workers that act on whatever arrives, not for Board's request/response.
The broker forces the client id to the user name (use_username_as_clientid),
so each process needs its own broker account.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Callable, Mapping

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .errors import EXIT_ENVIRONMENT, EXIT_USAGE, VoltgateError

ONLINE = b"online"
OFFLINE = b"offline"
QOS = 1
QUEUE_LEN = 256  # messages kept per device that nobody has taken yet


class MqttTransport:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        site_of: Mapping[str, str] | Callable[[str], str | None] | None = None,
        on_state: Callable[[str, bool], None] | None = None,
        shared: str | None = None,
        tls: dict | None = None,
        keepalive: int = 60,
        reconnect_delay: tuple[float, float] = (0.2, 10.0),
        queue_len: int = QUEUE_LEN,
    ):
        self.host, self.port = host, port
        self._site_of = site_of.get if isinstance(site_of, Mapping) else site_of
        self.on_state = on_state
        self.up_filter = f"$share/{shared}/vg/+/+/up" if shared else "vg/+/+/up"
        self.keepalive = keepalive
        self._queue_len = queue_len
        self._cv = threading.Condition()
        self._queues: dict[str, collections.deque] = {}
        self.online: dict[str, bool] = {}  # device -> its retained state, as last seen
        self.sites: dict[str, str] = {}  # device -> the site its topics name
        self.stats = {"sent": 0, "received": 0, "dropped": 0, "unsent": 0, "connects": 0}
        self._ready = threading.Event()
        self._refused: str | None = None
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311, clean_session=True)
        c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set(**tls)
        c.reconnect_delay_set(*reconnect_delay)
        c.on_socket_open = _no_delay
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message

    # -- life cycle

    def connect(self, timeout: float = 10.0) -> MqttTransport:
        """Connect and subscribe; returns once the subscriptions are granted."""
        try:
            self.client.connect(self.host, self.port, self.keepalive)
        except OSError as e:
            raise VoltgateError(f"cannot reach the MQTT broker at {self.host}:{self.port}: {e}", "is it running?", EXIT_ENVIRONMENT) from None
        self.client.loop_start()
        if not self._ready.wait(timeout) or self._refused:
            why = self._refused or f"no answer within {timeout:.0f} s"
            self.close()
            raise VoltgateError(f"the MQTT broker at {self.host}:{self.port} refused the server: {why}", "check the server's user name and password", EXIT_USAGE)
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttTransport:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    # -- the transport

    def send(self, device: str, payload: bytes) -> None:
        if not self._ready.is_set():
            self.stats["unsent"] += 1  # not queued in paho for later: the caller retries
            return
        self.client.publish(f"vg/{self.site(device)}/{device}/down", payload, QOS)
        self.stats["sent"] += 1

    def receive(self, device: str, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                q = self._queues.get(device)
                if q:
                    return q.popleft()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def site(self, device: str) -> str:
        s = self._site_of(device) if self._site_of is not None else None
        s = s or self.sites.get(device)
        if not s:
            raise VoltgateError(f"no site known for device {device!r}", "give site_of, or wait until the board has connected once", EXIT_USAGE)
        return s

    def wait_state(self, device: str, online: bool = True, timeout: float = 10.0) -> bool:
        """Wait until the device's state topic says online (or offline)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.online.get(device) is not online:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    # -- paho callbacks (its network thread)

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            self._refused = str(reason)
            self._ready.set()  # connect() reports the refusal
            return
        self.stats["connects"] += 1
        client.subscribe([(self.up_filter, QOS), ("vg/+/+/state", QOS)])

    def _on_subscribe(self, client, userdata, mid, reasons, props):
        self._refused = next((str(r) for r in reasons if r.is_failure), None)
        self._ready.set()

    def _on_disconnect(self, client, userdata, flags, reason, props):
        self._ready.clear()

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        if len(parts) != 4 or parts[0] != "vg":
            return
        _, site, device, leaf = parts
        if leaf == "up":
            with self._cv:
                self.sites[device] = site
                q = self._queues.get(device)
                if q is None:
                    q = self._queues[device] = collections.deque(maxlen=self._queue_len)
                if len(q) == q.maxlen:
                    self.stats["dropped"] += 1
                q.append(msg.payload)
                self.stats["received"] += 1
                self._cv.notify_all()
        elif leaf == "state" and msg.payload in (ONLINE, OFFLINE):
            online = msg.payload == ONLINE
            with self._cv:
                self.sites[device] = site
                self.online[device] = online
                self._cv.notify_all()
            if self.on_state is not None:
                self.on_state(device, online)


def _no_delay(client, userdata, sock) -> None:
    # Nagle's algorithm against the peer's delayed ACK costs ~40 ms per
    # QoS 1 request and reply (the broker sets it too: set_tcp_nodelay)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass
