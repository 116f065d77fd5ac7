"""The board's flash log (DESIGN.md, Readings log; protocol/SPEC.md section 6).

Append-only records in rotating segment files under <root>/log/:

  <8 hex digits>.seg   named by the seq of the first record written to it
                       (a lower bound once thinning has removed records)
  header, 12 bytes:    "VGL" 0x01 | epoch u32 | CRC32 of those 8 bytes
  record, 15 + body:   len u16 | crc u32 | seq u32 | ts u32 | type u8 | body

All integers little-endian. len counts the bytes after the crc (9 + body);
the crc is CRC32 (binascii.crc32) over the two len bytes and the len bytes
after the crc. body is CBOR. A reading (types 1..31) whose body is 4 ints
below 65536 takes at most 28 bytes (budget 32; [slot, mV, mA, 0.1 degC] is
typically 25). A segment is started at every boot, so a record's boot epoch
is its segment's, and when the next record would not fit in seg_bytes.

Durability: append() writes the record and flushes (an fsync on the unix
port, a littlefs sync on the ESP32) before it returns. A power cut can leave
one torn record at the end of the last segment: the boot scan finds it
(short, bad length, bad CRC, or a seq out of order), cuts it off and counts
the bytes (torn_bytes). It also skips as many seqs as the cut bytes could
have held, so a seq whose bytes were in the log is never reused. Bad data in
an older segment, or found by read(), cuts that segment at the bad record
(lost_bytes). Nothing that fails its CRC is ever returned. A tail cut exactly
at a record boundary looks like a log that ends there: those seqs may be
used again, under the new boot's epoch.

Files change in place only by appending. Every other change writes thin.tmp
(or seg.tmp for a new segment) and renames it over the segment, which is
atomic on littlefs and POSIX. The counters (next seq, acked seq, dropped
records per class, lost and torn bytes) live in meta (36 bytes with its
CRC32). A change that moves them writes meta.new, then renames thin.tmp over
the segment (the commit), then renames meta.new to meta. At boot, thin.tmp
present means not committed (both go); meta.new alone means committed (it
becomes meta, if whole). So a crash at any point loses no record that was
not being dropped, and counts every drop once.

Capacity: the segment files hold at most max_bytes. When an append would
exceed it, segments are rewritten oldest first without acknowledged records,
then without readings, then without events, and as a last resort without
billing records (types 64..95): no event is dropped while a reading is held,
no billing record while an event is. Records keep their seqs; readers skip
the gaps. The open segment is sealed and thinned like the others when it
holds the only records of the class being dropped.

The epoch is the caller's: a u32 that differs at every boot (system.py: 31
random bits, never the last boot's), so the server's key (device, epoch,
seq) stays unique even if the flash, and with it the seq counter, is wiped.

RAM: one segment-sized read buffer, a 15-byte record head and a 6-item list
per segment. Between segment rolls append() allocates nothing on the unix
port (on the ESP32 a CRC or timestamp of 2**30 or more is a boxed int).
"""

import os
import struct
from binascii import crc32

import cbor
import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


SEG_BYTES = const(4096)  # one littlefs block on the ESP32
MAX_BYTES = const(262144)
MAX_BODY = const(1024)

_MAGIC = b"VGL\x01"
_META_MAGIC = b"VGM\x01"
_SEG_HDR = const(12)
_FRAME = const(15)  # len 2 + crc 4 + seq 4 + ts 4 + type 1
_MIN_LEN = const(9)  # smallest value of len: seq + ts + type, empty body
_META_FMT = "<4sIIIIIII"  # magic, next seq, acked, dropped x3, lost bytes, torn bytes
_META_LEN = const(32)  # then its CRC32
_MIN_SEG = const(64)

_READINGS_END = const(32)  # wire.LOG_READINGS_END
_EVENTS_END = const(64)  # wire.LOG_EVENTS_END
_TYPES_END = const(96)

# thinning levels: what a rewrite removes
_CUT = const(-2)  # nothing: keep every valid record, drop what follows a bad one
_ACKED = const(-1)  # acknowledged records
# 0, 1, 2: acknowledged records and those of class <= level (readings, events, billing)
_BILLING = const(2)

# one list per segment in self._segs
_NAME = const(0)  # seq in the file name
_FIRST = const(1)  # first seq held (valid when _MASK)
_LAST = const(2)
_SIZE = const(3)  # bytes of header and valid records
_MASK = const(4)  # bit c set: holds records of class c
_EPOCH = const(5)

_BYTESLIKE = (bytes, bytearray, memoryview)


def _cls(t):
    if t < _READINGS_END:
        return 0
    return 1 if t < _EVENTS_END else 2


def _u32(b, p):
    return b[p] | b[p + 1] << 8 | b[p + 2] << 16 | b[p + 3] << 24


def _put32(b, p, v):
    b[p] = v & 0xFF
    b[p + 1] = (v >> 8) & 0xFF
    b[p + 2] = (v >> 16) & 0xFF
    b[p + 3] = (v >> 24) & 0xFF


def _hex8(name):
    for c in name[:8]:
        if c not in "0123456789abcdef":
            return False
    return True


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _bad_record(rtype, n, limit):
    raise ValueError("log record type %d / body %d bytes (types 1..95, body <= %d)" % (rtype, n, limit))


class Log:
    def __init__(self, root, epoch, seg_bytes=SEG_BYTES, max_bytes=MAX_BYTES):
        if seg_bytes < _MIN_SEG or max_bytes < 2 * seg_bytes:
            raise ValueError("log needs seg_bytes >= %d and max_bytes >= 2 * seg_bytes" % _MIN_SEG)
        self.epoch = epoch
        self.on_alarm = None  # fn(seq, ts, body) called after an alarm is stored
        self.dir = root.rstrip("/") + "/log"
        self.seg_bytes = seg_bytes
        self.max_bytes = max_bytes
        self.max_body = min(MAX_BODY, seg_bytes - _SEG_HDR - _FRAME)
        self._head = bytearray(_FRAME)
        mv = memoryview(self._head)
        self._lenv = mv[0:2]  # the CRC covers these two views, then the body
        self._restv = mv[6:_FRAME]
        self.acked = 0
        self.dropped = [0, 0, 0]  # readings, events, billing
        self.lost_bytes = 0
        self.torn_bytes = 0
        self.next_seq = 1
        self._segs = []
        self._used = 0
        self._f = None  # the open segment, always self._segs[-1]
        if not _exists(self.dir):
            if root and not _exists(root):
                os.mkdir(root)
            os.mkdir(self.dir)
        self._recover()
        self._scan()
        self._free_acked()
        self._make_room(0)  # starts this boot's segment

    # ------------------------------------------------------------ boot

    def _recover(self):
        d = self.dir
        if _exists(d + "/thin.tmp"):  # a rewrite that did not commit
            _remove(d + "/thin.tmp")
            _remove(d + "/meta.new")
        elif _exists(d + "/meta.new"):  # committed; meta.new is the truth if whole
            if self._load_meta(d + "/meta.new"):
                os.rename(d + "/meta.new", d + "/meta")
            else:
                _remove(d + "/meta.new")
        _remove(d + "/seg.tmp")
        self._load_meta(d + "/meta")

    def _load_meta(self, path):
        try:
            with open(path, "rb") as f:
                b = f.read(40)
        except OSError:
            return False
        if len(b) != _META_LEN + 4 or b[:4] != _META_MAGIC or crc32(b[:_META_LEN]) != _u32(b, _META_LEN):
            return False
        m = struct.unpack(_META_FMT, b[:_META_LEN])
        self.next_seq = m[1]
        self.acked = m[2]
        self.dropped = [m[3], m[4], m[5]]
        self.lost_bytes = m[6]
        self.torn_bytes = m[7]
        return True

    def _scan(self):
        names = [n for n in os.listdir(self.dir) if len(n) == 12 and n.endswith(".seg") and _hex8(n)]
        names.sort()
        big = self.seg_bytes
        sizes = []
        for n in names:
            sizes.append(os.stat(self.dir + "/" + n)[6])
            big = max(big, sizes[-1])
        self._buf = bytearray(big)
        self._mv = memoryview(self._buf)
        floor = max(self.next_seq, self.acked + 1)  # meta's next: seqs since thinned away
        prev = 0
        cuts = []
        empty = []
        for k in range(len(names)):
            name = int(names[k][:8], 16)
            s = self._scan_one(name, sizes[k], prev)
            prev = max(prev, s[_LAST])
            if sizes[k] > s[_SIZE]:  # bad bytes: the seqs they may hold are skipped
                floor = max(floor, max(prev, name - 1) + 1 + (sizes[k] - s[_SIZE] + _FRAME - 1) // _FRAME)
                cuts.append(len(self._segs))
                cuts.append(k == len(names) - 1)
            elif not s[_MASK]:  # header only (a boot without appends, or emptied)
                floor = max(floor, name)
                empty.append(name)
                continue
            self._segs.append(s)
            self._used += s[_SIZE]
        self.next_seq = max(floor, prev + 1)
        for name in empty:  # the one named next_seq: this boot's segment replaces it
            if name != self.next_seq:
                _remove(self._path(name))
        while cuts:  # last first: a rewrite may drop its segment from the index
            tail = cuts.pop()
            self._rewrite(cuts.pop(), _CUT, tail)

    def _scan_one(self, name, size, prev):
        s = [name, 0, 0, 0, 0, 0]
        got = self._load(name, size)
        if got < _SEG_HDR or self._buf[0:4] != _MAGIC or crc32(self._mv[0:8]) != _u32(self._buf, 8):
            return s  # size 0: the whole file is bad
        s[_EPOCH] = _u32(self._buf, 4)
        s[_SIZE] = self._walk(s, _SEG_HDR, got, max(prev, name - 1))
        return s

    def _walk(self, s, p, end, prev):
        # Valid records from p, seqs rising above prev; fills s; returns where they end.
        b = self._buf
        while p < end:
            n = self._check(p, end)
            seq = _u32(b, p + 6) if n else 0
            if seq <= prev:
                break
            if not s[_MASK]:
                s[_FIRST] = seq
            s[_LAST] = prev = seq
            s[_MASK] |= 1 << _cls(b[p + 14])
            p += n
        return p

    def _check(self, p, end):
        # Length of the valid record at p, or 0.
        b = self._buf
        if end - p < _FRAME:
            return 0
        n = b[p] | b[p + 1] << 8
        if n < _MIN_LEN or p + 6 + n > end:
            return 0
        if crc32(self._mv[p + 6 : p + 6 + n], crc32(self._mv[p : p + 2])) != _u32(b, p + 2):
            return 0
        return 6 + n

    # ------------------------------------------------------------ files

    def _path(self, name):
        return "%s/%08x.seg" % (self.dir, name)

    def _load(self, name, size):
        # Read up to size bytes of a segment into the buffer; return the count.
        with open(self._path(name), "rb") as f:
            return f.readinto(self._mv[0:size])

    def _start(self):
        # A new open segment named by the next seq (atomically replacing a
        # header-only segment of that name left by the previous boot).
        h = self._head
        h[0:4] = _MAGIC
        _put32(h, 4, self.epoch)
        _put32(h, 8, crc32(memoryview(h)[0:8]))
        tmp = self.dir + "/seg.tmp"
        with open(tmp, "wb") as f:
            f.write(memoryview(h)[0:_SEG_HDR])
            f.flush()
        name = self.next_seq
        os.rename(tmp, self._path(name))
        self._f = open(self._path(name), "ab")
        self._segs.append([name, 0, 0, _SEG_HDR, 0, self.epoch])
        self._used += _SEG_HDR

    def _seal(self):
        f = self._f
        self._f = None
        try:
            f.close()
        except OSError:
            pass

    def _stage_meta(self):
        d = self.dropped
        b = struct.pack(_META_FMT, _META_MAGIC, self.next_seq, self.acked, d[0], d[1], d[2], self.lost_bytes, self.torn_bytes)
        with open(self.dir + "/meta.new", "wb") as f:
            f.write(b)
            f.write(struct.pack("<I", crc32(b)))
            f.flush()

    def _commit_meta(self):
        os.rename(self.dir + "/meta.new", self.dir + "/meta")

    def _rewrite(self, i, level, tail=False):
        # Replace segment i by its valid records, less those the level removes
        # (counted as dropped); bytes from a bad record on are cut (counted).
        s = self._segs[i]
        path = self._path(s[_NAME])
        fsize = os.stat(path)[6]
        end = self._load(s[_NAME], min(s[_SIZE], fsize)) if s[_SIZE] else 0
        if not end:  # no readable header: a fresh one, and no records
            b = self._buf
            b[0:4] = _MAGIC
            _put32(b, 4, s[_EPOCH])
            _put32(b, 8, crc32(self._mv[0:8]))
            end = _SEG_HDR
        with open(self.dir + "/thin.tmp", "wb") as f:
            p, kept = self._copy(f, s, level, end)
            f.flush()
        bad = fsize - p if s[_SIZE] else fsize
        if tail:
            self.torn_bytes += bad
        else:
            self.lost_bytes += bad
        self._stage_meta()
        os.rename(self.dir + "/thin.tmp", path)  # the commit
        self._commit_meta()
        self._used += kept - s[_SIZE]
        s[_SIZE] = kept
        if not s[_MASK]:
            _remove(path)
            self._used -= kept
            del self._segs[i]

    def _copy(self, f, s, level, end):
        # Write the buffer's header and kept records to f, runs of kept
        # records in one write; update s. Returns (end of valid data, bytes kept).
        b = self._buf
        mv = self._mv
        f.write(mv[0:_SEG_HDR])
        s[_MASK] = 0
        p = run = kept = _SEG_HDR
        while p < end:
            n = self._check(p, end)
            if not n:
                break
            seq = _u32(b, p + 6)
            c = _cls(b[p + 14])
            if level == _CUT or (seq > self.acked and c > level):
                if not s[_MASK]:
                    s[_FIRST] = seq
                s[_LAST] = seq
                s[_MASK] |= 1 << c
                kept += n
            else:
                if seq > self.acked:
                    self.dropped[c] += 1
                if p > run:
                    f.write(mv[run:p])
                run = p + n
            p += n
        if p > run:
            f.write(mv[run:p])
        return p, kept

    def _free_acked(self):
        segs = self._segs
        while len(segs) > (0 if self._f is None else 1) and (not segs[0][_MASK] or segs[0][_LAST] <= self.acked):
            _remove(self._path(segs[0][_NAME]))
            self._used -= segs[0][_SIZE]
            del segs[0]

    # ------------------------------------------------------------ appending

    def append(self, rtype, body, ts):
        """Store a record; return its seq once it is durable. body: bytes-like
        CBOR as it is (e.g. encoded into a reused buffer: no
        allocation), or any other value, which is encoded with cbor.dumps.
        ts: Unix seconds (u32)."""
        if not isinstance(body, _BYTESLIKE):
            body = cbor.dumps(body)
        if rtype < 1 or rtype >= _TYPES_END or len(body) > self.max_body:
            _bad_record(rtype, len(body), self.max_body)
        need = _FRAME + len(body)
        if self._f is None or self._segs[-1][_SIZE] + need > self.seg_bytes or self._used + need > self.max_bytes:
            self._make_room(need)
        self._write(rtype, body, ts)
        seq = self._index(rtype, need)
        if rtype == wire.LOG_ALARM and self.on_alarm is not None:
            self.on_alarm(seq, ts, body)  # the link sends alarms unasked (link.py)
        return seq

    def _write(self, rtype, body, ts):
        # Kept within 11 words of locals and stack, as the helpers it calls,
        # so that MicroPython allocates no frame for it.
        h = self._head
        n = len(body) + _MIN_LEN
        h[0] = n & 0xFF
        h[1] = n >> 8
        _put32(h, 6, self.next_seq)
        _put32(h, 10, ts)
        h[14] = rtype
        n = crc32(self._lenv)
        n = crc32(self._restv, n)
        n = crc32(body, n)
        _put32(h, 2, n)
        self._emit(body)

    def _emit(self, body):
        try:
            self._f.write(self._head)
            self._f.write(body)
            self._f.flush()
        except OSError:
            self._write_failed()
            raise

    def _index(self, rtype, need):
        s = self._segs[-1]
        seq = self.next_seq
        if not s[_MASK]:
            s[_FIRST] = seq
        s[_LAST] = seq
        s[_MASK] |= 1 << _cls(rtype)
        s[_SIZE] += need
        self._used += need
        self.next_seq = seq + 1
        return seq

    def _write_failed(self):
        # The open segment may end in part of a record: seal it and cut that
        # off; the next append starts a new segment.
        self._seal()
        try:
            self._rewrite(len(self._segs) - 1, _CUT, True)
        except OSError:
            pass  # the next boot cuts it

    def _make_room(self, need):
        if self._f is not None and self._segs[-1][_SIZE] + need > self.seg_bytes:
            self._seal()
        if self._f is None:
            need += _SEG_HDR
        level = _ACKED
        while self._used + need > self.max_bytes:
            i = self._victim(level)
            if i >= 0:
                self._rewrite(i, level)
            elif self._f is not None and self._thins(self._segs[-1], level):
                self._seal()  # the open segment holds the only such records
                need += _SEG_HDR
            else:
                level += 1
                if level > _BILLING:
                    raise OSError(28)  # ENOSPC; max_bytes >= 2 segments rules it out
        if self._f is None:
            self._start()

    def _thins(self, s, level):
        # Would a rewrite at this level remove anything from segment s?
        if level == _ACKED:
            return s[_MASK] and s[_FIRST] <= self.acked
        return s[_MASK] & ((2 << level) - 1)

    def _victim(self, level):
        k = len(self._segs) - (1 if self._f is not None else 0)
        i = 0
        while i < k:
            if self._thins(self._segs[i], level):
                return i
            i += 1
        return -1

    # ------------------------------------------------------------ reading

    def read(self, from_seq, max_records=64, max_bytes=2048):
        """Records with seq >= from_seq, oldest first, as (seq, epoch, ts,
        type, body bytes) tuples: at most max_records, and no more than
        max_bytes of records as stored (15 + body each) unless the first
        alone is larger. Every record's CRC is checked again; a bad one cuts
        its segment there and is never returned."""
        out = []
        i = 0
        while i < len(self._segs) and len(out) < max_records:
            s = self._segs[i]
            if s[_MASK] and s[_LAST] >= from_seq:
                bad = self._read_seg(s, from_seq, out, max_records, max_bytes)
                if bad < 0:
                    break
                if bad:  # what it returned from segment i is all that stays
                    n = len(self._segs)
                    self._cut(i)
                    if len(self._segs) < n:
                        continue
            i += 1
        return out

    def _read_seg(self, s, from_seq, out, max_records, max_bytes):
        # 0: read to the end; -1: a bound was reached; 1: a bad record
        end = self._load(s[_NAME], s[_SIZE])
        b = self._buf
        p = _SEG_HDR
        used = 0
        for r in out:
            used += _FRAME + len(r[4])
        while p < s[_SIZE]:
            n = self._check(p, end)
            if not n:
                return 1
            seq = _u32(b, p + 6)
            if seq >= from_seq:
                if out and used + n > max_bytes:
                    return -1
                out.append((seq, s[_EPOCH], _u32(b, p + 10), b[p + 14], bytes(self._mv[p + _FRAME : p + n])))
                used += n
                if len(out) >= max_records:
                    return -1
            p += n
        return 0

    def _cut(self, i):
        if i == len(self._segs) - 1 and self._f is not None:
            self._seal()
        self._rewrite(i, _CUT)

    # ------------------------------------------------------------ sync and state

    def ack(self, upto_seq):
        """The server holds every record up to upto_seq: free the segments
        they fill (never the open one). Returns the acknowledged seq."""
        upto = min(upto_seq, self.next_seq - 1)
        if upto > self.acked:
            self.acked = upto
            self._stage_meta()
            self._commit_meta()
            self._free_acked()
        return self.acked

    def stats(self):
        first = last = 0
        for s in self._segs:
            if s[_MASK]:
                last = s[_LAST]
                if not first:
                    first = s[_FIRST]
        d = self.dropped
        return {
            "epoch": self.epoch,
            "first": first,
            "last": last,
            "next": self.next_seq,
            "acked": self.acked,
            "bytes": self._used,
            "max_bytes": self.max_bytes,
            "segments": len(self._segs),
            "dropped_readings": d[0],
            "dropped_events": d[1],
            "dropped_billing": d[2],
            "lost_bytes": self.lost_bytes,
            "torn_bytes": self.torn_bytes,
        }

    def close(self):
        if self._f is not None:
            self._seal()
