# The board's side of the links (protocol/SPEC.md, 3. Messages): one request
# in, one reply out, whatever carries them (mqtt.py on MQTT, serlink.py on
# the serial line). The transports call handle(); alarms the application
# logs wait in outbox for them to send unasked.
#
# Commands that change the board are COSE_Mac0 under the device key
# (protocol/command.py). Each carries a counter higher than every one
# accepted before (kept in the store as "cmd_ctr", written before the
# command acts) and an expiry the board's time floor must not have passed;
# a time sync answers instead the nonce of the board's latest hello. Every
# signed command, accepted or refused, is a LOG_COMMAND record with its
# reason.
import cbor
import command
import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


VERSION = "0.1.0"
_OUTBOX = const(8)  # alarms kept for the transport; older ones are in the log
_BATCH_RECORDS = const(64)
_BATCH_BYTES = const(1536)  # of records as stored: a batch stays inside MAX_FRAME
_MAX_REQUEST = const(768)  # bytes: a 512-byte permit and its envelope; more is refused undecoded
_MAX_PING = const(256)  # bytes a ping may carry (echoed)
_MAX_CTR = const(0x7FFFFFFFFFFFFFFF)  # a counter above would leave none higher for the next command
# refusals decided before the MAC was found good: counted, not logged (a
# flood of junk must not write the flash)
_PRE_MAC = (wire.MALFORMED, wire.TOO_LARGE, wire.BAD_ALG, wire.NO_KEY, wire.UNKNOWN_KEY, wire.BAD_MAC)
# the app command each signed request calls (None: the link's own)
_APP = {
    wire.MSG_REVOKE: "revoke",
    wire.MSG_RELAY_OFF: "relay_off",
    wire.MSG_UNLOCK: "unlock",
    wire.MSG_CLEAR_FAULT: "clear_fault",
    wire.MSG_CONFIG: "config",
    wire.MSG_ACK: None,
    wire.MSG_TIME_SYNC: None,
}


class Link:
    def __init__(self, p, app):
        self.p = p
        self.app = app
        self.outbox = []
        raw = p.hw.store.get("cmd_ctr")
        self.ctr = int.from_bytes(raw, "big") if raw else 0
        self.junk = 0  # commands refused before their MAC was found good
        self._last = None  # (token, reply) of the last command accepted: a retry gets the same reply
        p.log.on_alarm = self._alarm

    def handle(self, data):
        """The reply (bytes) to one request (bytes), or None when data is not
        a request (a board never answers a reply)."""
        if len(data) > _MAX_REQUEST:
            return _error(None, wire.TOO_LARGE, "request too large")
        try:
            return self._handle(data)
        except MemoryError:
            import gc

            gc.collect()
            return _error(None, wire.TOO_LARGE, "out of memory")

    def _handle(self, data):
        try:
            env = cbor.loads(data, 6)
        except ValueError:
            return _error(None, wire.MALFORMED, "not a CBOR message")
        if not isinstance(env, dict) or not isinstance(env.get(wire.ENV_TYPE), int):
            return _error(None, wire.MALFORMED, "not a message")
        t = env[wire.ENV_TYPE]
        rid = env.get(wire.ENV_ID)
        if rid is not None and not (isinstance(rid, int) and 0 <= rid <= 0xFFFFFFFF):
            return _error(None, wire.MALFORMED, "bad request id")
        if t >= wire.MSG_REPLY or t < 1:
            return None
        dev = env.get(wire.ENV_DEVICE)
        if dev is not None and dev != self.p.ident.device_id:
            return _error(rid, wire.WRONG_AUDIENCE, "for another device")
        body = env.get(wire.ENV_BODY)
        try:
            if t in _APP:
                last = self._last
                if last is not None and body == last[0]:
                    return last[1]  # a retry of the command just done: its reply again, not a second run
                r, body = self._signed(t, body)
                if r != wire.OK:
                    return _error(rid, r, "command refused")
                r, out = self._command(t, body)
                if t != wire.MSG_TIME_SYNC:
                    self._last = (env[wire.ENV_BODY], _reply(rid, t, r, out))
                    return self._last[1]
            elif t == wire.MSG_GET_LOG:
                return self._batch(rid, body)
            else:
                r, out = self._query(t, body)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            r, out = wire.MALFORMED, "bad body"
        return _reply(rid, t, r, out)

    # -- requests anyone on the link may make

    def _query(self, t, body):
        p = self.p
        if t == wire.MSG_HELLO or t == wire.MSG_STATUS:
            c = p.clock
            s = p.log.stats()
            out = {
                "dev": p.ident.device_id,
                "kind": p.hw.kind,
                "epoch": p.epoch,
                "log": [s["first"], s["last"], s["next"], s["acked"]],
                "dropped": [s["dropped_readings"], s["dropped_events"], s["dropped_billing"]],
                "clock": [c.trusted, c.floor(), c.now()],
                "ctr": self.ctr,
            }
            if t == wire.MSG_HELLO:
                out["fw"] = VERSION
                out["board"] = p.config["name"]
                out["site"] = p.ident.site
                out["nonce"] = c.begin_sync()
                out["junk"] = self.junk + c.junk
            else:
                out["app"] = self.app.status()
            return wire.OK, out
        if t == wire.MSG_PING:
            if not (body is None or isinstance(body, int) or isinstance(body, (bytes, str)) and len(body) <= _MAX_PING):
                return wire.MALFORMED, "ping carries an int, or bytes or text of at most 256"
            return wire.OK, body
        if t == wire.MSG_PRESENT:
            if isinstance(body, list):
                r, d = self.app.present(body[0], body[1])
            else:
                r, d = self.app.present(body)
            return wire.OK, [r, d if d is None or isinstance(d, (int, str)) else str(d)]
        return wire.MALFORMED, "unknown request"

    def _batch(self, rid, body):
        # body [from_seq] or [from_seq, max_records]. The reply body is
        # [next_seq, run...], run = [epoch, record...], record = [seq, ts,
        # type, body] with each body spliced in as stored (SPEC.md 3.)
        frm = body[0]
        n = body[1] if len(body) > 1 else _BATCH_RECORDS
        if not isinstance(frm, int) or not isinstance(n, int) or frm < 0 or n < 1:
            raise ValueError
        log = self.p.log
        recs = log.read(frm, min(n, _BATCH_RECORDS), _BATCH_BYTES)
        runs = 0
        e = None
        for r in recs:
            if r[1] != e:
                e = r[1]
                runs += 1
        head = cbor.encode_head
        out = bytearray(b"\xa3\x00\x18\x23\x01")  # {0: 35, 1: id, 3: [next, run...]}
        out.extend(cbor.dumps(rid))
        out.append(3)
        head(out, 4, 1 + runs)
        head(out, 0, log.next_seq)
        i = 0
        while i < len(recs):
            e = recs[i][1]
            j = i
            while j < len(recs) and recs[j][1] == e:
                j += 1
            head(out, 4, 1 + j - i)
            head(out, 0, e)
            while i < j:
                r = recs[i]
                out.append(0x84)
                head(out, 0, r[0])
                head(out, 0, r[2])
                head(out, 0, r[3])
                out.extend(r[4])
                i += 1
        if len(out) > wire.MAX_FRAME:  # one record over the batch bound
            return _error(rid, wire.TOO_LARGE, "record too large for a batch")
        return bytes(out)

    # -- signed commands

    def _signed(self, t, token):
        p = self.p
        if not isinstance(token, bytes):
            r, env = wire.BAD_MAC, None
        elif t == wire.MSG_TIME_SYNC:
            return p.clock.sync(token, p.ident.current()), None  # logs its own verdicts
        else:
            r, env = command.verify(token, p.ident.current())
        ctr = None
        if r == wire.OK:
            ctr = env.get(wire.ENV_COUNTER)
            exp = env.get(wire.ENV_EXP)
            if env[wire.ENV_TYPE] != t or not isinstance(ctr, int) or not isinstance(exp, int):
                r = wire.MALFORMED
            elif env.get(wire.ENV_DEVICE) != p.ident.device_id:
                r = wire.WRONG_AUDIENCE
            elif ctr <= self.ctr or ctr > _MAX_CTR:
                r = wire.REPLAYED
            elif exp < p.clock.floor():
                r = wire.EXPIRED
        if r in _PRE_MAC:
            self.junk += 1
            return r, None
        p.log.append(wire.LOG_COMMAND, [t, r, ctr], p.clock.floor())
        if r != wire.OK:
            return r, None
        self.ctr = ctr
        st = p.hw.store
        st.set("cmd_ctr", ctr.to_bytes(8, "big"))
        st.commit()
        return r, env.get(wire.ENV_BODY)

    def _command(self, t, body):
        p = self.p
        if t == wire.MSG_ACK:
            if not isinstance(body, int):
                raise ValueError
            return wire.OK, p.log.ack(body)
        if t == wire.MSG_TIME_SYNC:
            return wire.OK, p.clock.now()
        return self.app.command(_APP[t], body)

    # -- unasked

    def _alarm(self, seq, ts, body):
        if len(self.outbox) >= _OUTBOX:
            self.outbox.pop(0)
        b = bytearray()
        cbor.encode_head(b, 5, 2)  # {0: 64, 3: [seq, ts, body]}
        b.extend(b"\x00\x18\x40\x03\x83")
        cbor.encode_head(b, 0, seq)
        cbor.encode_head(b, 0, ts)
        b.extend(body)
        self.outbox.append(bytes(b))


def _reply(rid, t, r, out):
    if r != wire.OK:
        return _error(rid, r, out)
    out = cbor.dumps({wire.ENV_TYPE: wire.MSG_REPLY + t, wire.ENV_ID: rid, wire.ENV_BODY: out})
    if len(out) > wire.MAX_FRAME:  # every reply fits one serial frame
        return _error(rid, wire.TOO_LARGE, "reply too large")
    return out


def _error(rid, reason, text):
    return cbor.dumps({wire.ENV_TYPE: wire.MSG_ERROR, wire.ENV_ID: rid, wire.ENV_REASON: reason, wire.ENV_BODY: text})
