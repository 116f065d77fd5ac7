# The board's MQTT link (DESIGN.md, Links; protocol/SPEC.md 3, MQTT
# transport): one task that keeps a connection to the broker and carries
# link.py's messages over it, on umqtt.simple's MQTTClient.
#
# Settings: the store's "link" map (CBOR, read by identity.py):
#   "host"       the broker (an IP address keeps a DNS lookup out of the loop)
#   "port"       default 1883, 8883 with TLS
#   "keepalive"  seconds, default (and for 0) 60: a PINGREQ after keepalive/2
#                without sending; a connection that received nothing for
#                keepalive is dropped
#   "tls"        true: TLS (the ssl module); "ca": the CA certificate (DER)
#                the broker's must chain to, else the broker is not verified
#   "io_ms"      socket timeout in ms, default 500 (the bound below)
# Client id = user name = device id, password = HMAC-SHA256(device key,
# "voltgate/mqtt/v1")[:16] in hex (voltgate.keys.mqtt_password). The last
# will is "offline", retained, QoS 1, on vg/<site>/<device>/state; once
# connected the board subscribes to .../down (QoS 1), then publishes
# "online" on .../state. Each request on down is answered on .../up (QoS 1),
# as are the alarms in link.outbox. Clean sessions: what the server sent
# while the board was away is gone, and the server asks again. A lost
# connection is tried again after 1 s doubling to 60 s, each wait drawn
# from [w/2, w).
#
# Blocking bound: umqtt's calls block, and while they do no other task
# runs. Every socket operation gives up after io_ms (the timeout is set
# before the TCP connect; umqtt's wait_msg, whose setblocking(True) clears
# it on the ESP32, is replaced below), a wait for an acknowledgement
# (CONNACK, SUBACK, PUBACK) gives up io_ms after its step began, and each
# step makes one umqtt call before the task yields. So a step holds the
# event loop for at most 2 * io_ms (1 s by default) while the broker
# answers, and about io_ms once it stops answering; not bounded by it: the
# DNS lookup of a host name, and the TLS handshake (each of its exchanges
# waits at most io_ms, plus its crypto).
import select
import socket
import struct
from binascii import hexlify
from random import getrandbits
from time import ticks_diff, ticks_ms

from hmac256 import HMAC256
from umqtt.simple import MQTTClient, MQTTException

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_IO_MS = const(500)
_POLL_MS = const(20)  # between steps while connected and idle
_BUSY_MS = const(500)  # after a message arrives: the server is likely pulling, so
_BUSY_POLL_MS = const(2)  # poll this often until _BUSY_MS pass without one
_SLICE_MS = const(5000)  # longest sleep between check-ins while waiting to retry
_RETRY_MS = const(1000)
_RETRY_MAX_MS = const(60000)
_KEEPALIVE_S = const(60)
_QUEUE = const(4)  # requests received and not yet answered; the oldest goes
_MAX_MSG = const(2048)  # a packet from the broker; requests are far smaller (a permit <= 512 B); a longer one drops the connection
_ETIMEDOUT = const(110)
_ERRORS = (OSError, MQTTException, AssertionError, IndexError, TypeError, ValueError)


class MqttLink(MQTTClient):
    name = "mqtt"
    watch_ms = 3 * _SLICE_MS

    def __init__(self, p, link, settings):
        dev = p.ident.device_id.encode()
        self._tls = bool(settings.get("tls"))
        pw = hexlify(HMAC256(p.hw.store.get("key") or b"").mac(b"voltgate/mqtt/v1")[:16])
        port = settings.get("port") or (8883 if self._tls else 1883)
        MQTTClient.__init__(self, dev, settings["host"], port, dev, pw, settings.get("keepalive") or _KEEPALIVE_S)
        t = b"vg/" + (p.ident.site or "").encode() + b"/" + dev + b"/"
        self.set_last_will(t + b"state", b"offline", True, 1)
        self.cb = True  # umqtt's subscribe() insists on one; wait_msg below queues instead
        self._up = t + b"up"
        self._down = t + b"down"
        self._ca = settings.get("ca")
        self._io = settings.get("io_ms") or _IO_MS
        self._link = link
        self._hw = p.hw
        self._q = []
        self.dropped = 0  # requests the queue dropped
        self._ph = 0  # 0 down, 1 connected, 2 subscribed, 3 online
        self._poll = None
        self._wait = _RETRY_MS
        self._at = self._t0 = self._tx = self._rx = p.hw.ticks_ms()

    async def run(self, sup):
        hw = self._hw
        while True:
            sup.beat(self.name)
            ms = _POLL_MS
            self._t0 = ticks_ms()  # the step's deadline runs on the real clock
            try:
                if not self._ph:
                    if hw.ticks_diff(hw.ticks_ms(), self._at) >= 0:
                        self.connect()
                        ms = 0
                elif self._ph < 3 or self._q or self._link.outbox:
                    self._step()
                    ms = 0
                else:
                    # idle: in this frame, which is allocated once, so that
                    # polling allocates nothing
                    for _ in self._poll.ipoll(0):
                        self.wait_msg()
                        ms = 0
                    if ms and hw.ticks_diff(hw.ticks_ms(), self._tx) >= self.keepalive * 500:
                        self._step()
                    elif ms and hw.ticks_diff(hw.ticks_ms(), self._rx) < _BUSY_MS:
                        ms = _BUSY_POLL_MS
            except _ERRORS as e:
                self._lost(e)
            if not self._ph:
                ms = min(max(hw.ticks_diff(self._at, hw.ticks_ms()), 1), _SLICE_MS)
            await hw.sleep_ms(ms)

    def connect(self):
        # umqtt's connect() has no socket timeout, no TCP_NODELAY and imports
        # ussl, which current MicroPython lacks
        s = self.sock = socket.socket()
        s.settimeout(self._io / 1000)
        try:
            s.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY: ~44 ms less per QoS 1 round trip
        except OSError:
            pass
        s.connect(socket.getaddrinfo(self.server, self.port)[0][-1])
        if self._tls:
            import ssl

            ca = self._ca
            req = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
            s = self.sock = ssl.wrap_socket(s, server_hostname=self.server, cert_reqs=req, cadata=ca)
        # CONNECT, MQTT 3.1.1: user, password, will retained at QoS 1, clean session
        b = bytearray(b"\x00\x04MQTT\x04\xee")
        b.extend(struct.pack("!H", self.keepalive))
        for f in (self.client_id, self.lw_topic, self.lw_msg, self.user, self.pswd):
            b.extend(struct.pack("!H", len(f)))
            b.extend(f)
        n = len(b)
        h = bytearray(b"\x10")
        while n > 0x7F:
            h.append(n & 0x7F | 0x80)
            n >>= 7
        h.append(n)
        s.write(h)
        s.write(b)
        r = s.read(4)  # CONNACK
        if r[0] != 0x20 or r[3]:
            raise MQTTException(r[3])
        self._poll = select.poll()
        self._poll.register(s, select.POLLIN)
        self._ph = 1
        self._tx = self._rx = self._hw.ticks_ms()

    def _step(self):
        # one umqtt call: subscribe, announce, answer a request, send an
        # alarm or, when keepalive/2 passed without sending, ping
        hw = self._hw
        ph = self._ph
        self.pid &= 0x7FFF  # umqtt counts on past 65535, and packet id 0 is invalid
        if ph == 1:
            self.subscribe(self._down, 1)
        elif ph == 2:
            self.publish(self.lw_topic, b"online", True, 1)
            self._wait = _RETRY_MS
            print("mqtt: online")
        elif self._q:
            r = self._link.handle(self._q.pop(0))
            if r is not None:
                self._t0 = ticks_ms()  # the handling (a flash commit) does not count against the reply's io_ms
                self.publish(self._up, r, False, 1)
        elif self._link.outbox:
            self.publish(self._up, self._link.outbox[0], False, 1)
            self._link.outbox.pop(0)  # only once the broker has it
        elif hw.ticks_diff(hw.ticks_ms(), self._rx) >= self.keepalive * 1000:
            raise OSError(_ETIMEDOUT)  # not even a PINGRESP since the last ping
        else:
            self.ping()
        if ph < 3:
            self._ph = ph + 1
        self._tx = hw.ticks_ms()

    def wait_msg(self):
        # umqtt's, without its setblocking(True), with the step's deadline,
        # reading a packet in one piece; a request is queued, not handed to
        # a callback: publish() calls this while it waits for its PUBACK
        if ticks_diff(ticks_ms(), self._t0) > self._io:
            raise OSError(_ETIMEDOUT)
        s = self.sock
        op = s.read(1)
        if not op:
            raise OSError(-1)  # the broker closed the connection
        self._rx = self._hw.ticks_ms()
        op = op[0]
        if op == 0xD0:  # PINGRESP
            s.read(1)
            return None
        if op & 0xF0 != 0x30:
            return op  # an acknowledgement: publish() and subscribe() read the rest
        n = self._recv_len()
        if n > _MAX_MSG:
            raise OSError(-1)
        b = s.read(n)  # topic length, topic, packet id at QoS 1, payload
        n = 2 + (b[0] << 8 | b[1])
        if op & 6:
            s.write(b"\x40\x02" + b[n : n + 2])  # PUBACK
        q = self._q
        if b[2:n] == self._down:
            if len(q) >= _QUEUE:
                q.pop(0)
                self.dropped += 1
            q.append(b[n + 2 if op & 6 else n :])
        return None

    def _lost(self, e):
        hw = self._hw
        try:
            self.sock.close()
        except (AttributeError, OSError):
            pass
        self.sock = self._poll = None
        self._ph = 0
        w = self._wait
        d = (w >> 1) + (getrandbits(8) * w >> 9)
        self._at = hw.ticks_add(hw.ticks_ms(), d)
        self._wait = min(w * 2, _RETRY_MAX_MS)
        print("mqtt: down (%r), retry in %d ms" % (e, d))
