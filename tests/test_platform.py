"""Firmware platform on the MicroPython unix port with the simulated HAL:
identity and keys, the trusted clock (and attempts to roll it back), and the
permit checker's persisted stores across reboots and power cuts."""

import itertools
import json

import pytest

from voltgate import commands, keys, permits, tree, wire

BOARD = str(tree.boards_dir() / "station-4-devkitc.json")
DEVICE = "st-0001"
MASTER = bytes(range(32))
KEY = keys.derive_device_key(MASTER, DEVICE, 1)
START = 1_800_000_000  # the sim world's Unix time at 0 ms
_names = itertools.count()


def store(**over):
    s = {"dev_id": DEVICE.encode().hex(), "key": KEY.hex(), "key_ver": 1, "site": b"depot".hex()}
    s.update(over)
    return {k: v for k, v in s.items() if v is not None}


def _board_file(tmp_path, ext_rtc: bool) -> str:
    data = json.loads(open(BOARD).read())
    if not ext_rtc:
        del data["rtc"]
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def board(mp_worker, tmp_path, request):
    """A fresh simulated station (no external RTC unless the test is marked
    with @pytest.mark.ext_rtc); returns a caller for simboard functions."""
    name = f"b{next(_names)}"
    ext = request.node.get_closest_marker("ext_rtc") is not None
    mp_worker.call("simboard", "new", name, _board_file(tmp_path, ext), str(tmp_path), store())

    def call(fn, *args):
        return mp_worker.call("simboard", fn, name, *args)

    call.name = name
    return call


def permit(now, **over):
    args = dict(device_id=DEVICE, user_id="u1", action="rent", not_before=now - 60, expires=now + 3600, issued_at=now - 60)
    args.update(over)
    return permits.issue(KEY, 1, **args).hex()


def sync_now(board, t):
    nonce = bytes.fromhex(board("begin_sync"))
    return board("sync", commands.time_sync(t, nonce, KEY, 1).hex())


# ---------------------------------------------------------------- clock


def test_clock_starts_untrusted_and_a_signed_sync_trusts_it(board):
    st = board("state")
    assert st["trusted"] is False and st["now"] is None
    assert wire.reason_name(board("check", permit(START), wire.ACTION_RENT, 0)["reason"]) == "time_untrusted"
    assert sync_now(board, START) == wire.OK
    st = board("state")
    assert st["trusted"] and st["now"] == START
    assert wire.reason_name(board("check", permit(START), wire.ACTION_RENT, 0)["reason"]) == "ok"
    assert board("advance", 90)["now"] == START + 90


def test_sync_may_step_below_the_floor(board):
    board("saw_iat", START + 5000)  # a permit's iat raised the floor while untrusted
    assert board("state")["floor"] == START + 5000
    assert sync_now(board, START) == wire.OK
    assert board("state")["now"] == START


def test_rollback_attempts_are_refused(board, mp_worker):
    # 1: an old sync answer replayed: its nonce is not the outstanding one
    nonce = bytes.fromhex(board("begin_sync"))
    old = commands.time_sync(START, nonce, KEY, 1).hex()
    assert board("sync", old) == wire.OK
    board("advance", 3600)
    board("begin_sync")
    assert board("sync", old) == wire.REPLAYED
    # 2: the same answer twice for one nonce
    nonce = bytes.fromhex(board("begin_sync"))
    tok = commands.time_sync(START + 3600, nonce, KEY, 1).hex()
    assert board("sync", tok) == wire.OK and board("sync", tok) == wire.REPLAYED
    # 3: forged: right nonce, wrong key
    nonce = bytes.fromhex(board("begin_sync"))
    forged = commands.time_sync(START - 86400, nonce, keys.derive_device_key(MASTER, "other", 1), 1).hex()
    assert board("sync", forged) == wire.BAD_MAC
    # 4: a permit is not a time sync, though MACed with the same key
    assert board("sync", permit(START)) == wire.BAD_MAC
    # 5: an answer that comes too late
    nonce = bytes.fromhex(board("begin_sync"))
    board("advance", 61)
    assert board("sync", commands.time_sync(START, nonce, KEY, 1).hex()) == wire.EXPIRED
    # the clock never went back
    st = board("state")
    assert st["now"] == START + 3600 + 61
    refusals = [r[1][0] for r in board("records", wire.LOG_CLOCK)]
    assert refusals.count("sync_replayed") == 2 and "sync_expired" in refusals
    # answers without a valid MAC are counted, not logged: junk must not write the flash
    assert "sync_bad_mac" not in refusals


def test_iat_far_ahead_does_not_move_a_trusted_clock(board):
    assert sync_now(board, START) == wire.OK
    tok = permit(START, issued_at=START + 86400 * 365, not_before=START - 60)
    assert wire.reason_name(board("check", tok, wire.ACTION_RENT, 0)["reason"]) == "ok"
    assert board("state")["now"] == START  # ignored: more than 300 s ahead
    assert ["iat_ahead", START, START + 86400 * 365] in [r[1] for r in board("records", wire.LOG_CLOCK)]
    board("check", permit(START, issued_at=START + 200), wire.ACTION_RENT, 0)
    assert board("state")["now"] == START + 200  # drift correction within 300 s


def test_clock_survives_reboot_as_a_floor_not_as_trust(board):
    assert sync_now(board, START) == wire.OK
    board("advance", 1300)  # persisted at 600 s and 1200 s
    st = board("reboot", True)  # power cut: the chip RTC forgets
    assert st["trusted"] is False and st["now"] is None
    assert START + 1200 <= st["floor"] <= START + 1300  # rollback bounded by the persist interval


def test_soft_reset_keeps_the_chip_rtc_time(board):
    assert sync_now(board, START) == wire.OK
    board("advance", 100)
    st = board("reboot", False)
    assert st["floor"] == START + 100 and st["trusted"] is False


@pytest.mark.ext_rtc
def test_external_rtc_restores_trust_at_boot(board):
    board("set_rtc", "ext", START + 50)
    st = board("reboot", True)
    assert st["trusted"] and st["now"] == START + 50


@pytest.mark.ext_rtc
def test_a_sync_sets_the_external_rtc_for_the_next_boot(board):
    assert sync_now(board, START) == wire.OK
    board("advance", 30)
    st = board("reboot", True)
    assert st["trusted"] and st["now"] == START + 30


@pytest.mark.ext_rtc
def test_external_rtc_behind_the_floor_is_not_trusted(board):
    assert sync_now(board, START) == wire.OK
    board("advance", 700)
    board("set_rtc", "ext", START - 86400)  # the chip lost its battery
    st = board("reboot", True)
    assert st["trusted"] is False and st["floor"] >= START + 600


# ---------------------------------------------------------------- permits


def test_single_use_permit_stays_used_across_a_power_cut(board):
    sync_now(board, START)
    tok = permit(START)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.REPLAYED
    board("reboot", True)
    sync_now(board, START + 10)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.REPLAYED


def test_exi_counts_run_time_across_reboots(board):
    tok = permit(START, not_before=None, expires=START + 30 * 86400, exi=1800, single_use=False)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK  # untrusted clock: exi applies
    board("advance", 400)
    run_before = board("state")["run_s"]
    after = board("reboot", True)
    # the unrecorded tail before the cut counts as a whole persist interval
    assert after["run_s"] >= run_before
    # nothing was persisted since the first use: the 400 s count as 600
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK
    board("advance", 1199)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK  # 1799 s counted
    board("advance", 1)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.EXPIRED


def test_power_cycling_does_not_stretch_an_exi_permit(board):
    tok = permit(START, not_before=None, expires=START + 30 * 86400, exi=1800, single_use=False)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK
    for _ in range(4):  # cut the power every 5 minutes
        board("advance", 300)
        board("reboot", True)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.EXPIRED  # 20 min of use, counted as >= 30


def test_revocations_persist_and_are_pruned_after_expiry(board):
    sync_now(board, START)
    tok = permit(START, single_use=False)
    cti = permits.claims_of(bytes.fromhex(tok))[wire.CLAIM_CTI]
    assert board("revoke", cti.hex(), START + 3600, None, 0) == wire.OK
    assert board("revoke", None, 0, "u9", START + 7200) == wire.OK
    board("reboot", False)
    sync_now(board, START + 10)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.REVOKED
    assert board("use", permit(START, user_id="u9"), wire.ACTION_RENT, 0) == wire.REVOKED
    assert board("counts")[2] == 2
    board("advance", 3700)  # past exp, but the persisted time is not yet
    assert board("prune") == 0
    board("advance", 600)  # the next persist is past exp + leeway
    assert board("prune") == 1 and board("counts")[2] == 1  # the permit's entry, not the user's


def test_used_store_fails_closed_when_full(board):
    sync_now(board, START)
    for i in range(128):  # permits.MAX_USED
        assert board("use", permit(START, cti=i.to_bytes(8, "big")), wire.ACTION_RENT, 0) == wire.OK
    assert board("use", permit(START, cti=b"\xff" * 8), wire.ACTION_RENT, 0) == wire.STORE_FULL
    many = permit(START, cti=b"\xfe" * 8, single_use=False)
    assert board("use", many, wire.ACTION_RENT, 0) == wire.OK  # needs no room
    board("advance", 4300)  # all expired, also for the persisted time: room again
    assert board("use", permit(START + 4300, cti=b"\xfd" * 8), wire.ACTION_RENT, 0) == wire.OK


def test_every_verdict_is_logged_with_its_reason(board):
    sync_now(board, START)
    board("check", permit(START), wire.ACTION_RENT, 0)
    board("check", permit(START, expires=START - 120, not_before=START - 300, issued_at=START - 300), wire.ACTION_RENT, 0)
    board("check", "00", wire.ACTION_RENT, 0)
    logged = [r[1][0] for r in board("records", wire.LOG_PERMIT)]
    assert logged == [wire.OK, wire.EXPIRED, wire.MALFORMED]


def test_garbage_tokens_cannot_flood_the_log(board):
    sync_now(board, START)
    for _ in range(500):
        board("check", "00", wire.ACTION_RENT, 0)
    board("advance", 10)
    board("check", "a0", wire.ACTION_RENT, 0)
    records = board("records", wire.LOG_PERMIT)
    assert [r[1][0] for r in records] == [wire.MALFORMED, wire.MALFORMED]
    assert records[1][1][5] == 499  # the ones not logged are counted
    for _ in range(3):  # authenticated verdicts are always logged
        board("check", permit(START, expires=START - 120, not_before=START - 300, issued_at=START - 300), wire.ACTION_RENT, 0)
    assert len(board("records", wire.LOG_PERMIT)) == 5


# ---------------------------------------------------------------- identity


def test_identity_from_the_store(board):
    i = board("ident")
    assert i == {"device_id": DEVICE, "has_key": True, "problems": [], "site": "depot", "link": {}}


@pytest.mark.parametrize(
    "over,problem",
    [({"key": None}, "no device key"), ({"key": "00" * 16}, "device key in the store is invalid"), ({"key_ver": 0}, "invalid")],
)
def test_a_board_without_a_valid_key_refuses_every_permit(mp_worker, tmp_path, over, problem):
    name = f"nokey{next(_names)}"
    mp_worker.call("simboard", "new", name, _board_file(tmp_path, False), str(tmp_path), store(**over))
    i = mp_worker.call("simboard", "ident", name)
    assert not i["has_key"] and any(problem in p for p in i["problems"])
    got = mp_worker.call("simboard", "check", name, permit(START), wire.ACTION_RENT, 0)
    assert wire.reason_name(got["reason"]) == "no_key"
    assert mp_worker.call("simboard", "records", name, wire.LOG_PERMIT)[0][1][0] == wire.NO_KEY


# ---------------------------------------------------------------- from review: what must not reopen a permit


def test_prune_then_power_cut_does_not_reopen_a_used_permit(board):
    tok = permit(START, not_before=None, expires=START + 1000, exi=5000)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK  # untrusted: exi path
    board("saw_iat", START)  # the floor is at START (server time)
    board("advance", 1100)  # floor START + 1100 > exp; persisted at most START + 1070ish
    board("prune")
    board("reboot", True)
    assert wire.reason_name(board("check", tok, wire.ACTION_RENT, 0)["reason"]) in ("replayed", "expired")


def test_far_future_iat_on_an_untrusted_clock_cannot_make_the_board_forget(board):
    tok = permit(START, not_before=None, expires=START + 3600, exi=600)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK
    # an authentic permit with a bogus iat (a server bug) raises the floor...
    board("check", permit(START, issued_at=START + 10**8, expires=START + 10**8 + 10), wire.ACTION_RENT, 0)
    assert board("state")["floor"] == START + 10**8
    assert board("prune") == 0  # ...but not what the stores forget by
    assert sync_now(board, START + 10) == wire.OK  # and a sync puts it back
    assert board("state")["floor"] == START + 10
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.REPLAYED


def test_a_lost_clock_entry_is_restored_from_the_permit_store(mp_worker, board):
    assert sync_now(board, START) == wire.OK
    tok = permit(START, exi=600, expires=START + 86400)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.OK
    board("advance", 100)
    assert board("use", tok, wire.ACTION_RENT, 0) == wire.REPLAYED
    mp_worker.call("simboard", "forget_store_key", board.name, "clock")
    st = board("reboot", True)
    assert st["floor"] >= START  # not 1970
    many = permit(START, exi=600, expires=START + 86400, single_use=False, cti=b"\x0c" * 8)
    assert board("use", many, wire.ACTION_RENT, 0) == wire.OK


def test_a_damaged_permit_store_refuses_every_permit_until_recovered(mp_worker, board, tmp_path):
    sync_now(board, START)
    assert board("use", permit(START), wire.ACTION_RENT, 0) == wire.OK
    good = (tmp_path / "permits.bin").read_bytes()
    flipped = bytearray(good)
    flipped[40] ^= 0x01  # one bit inside the used table: the CRC catches it
    for damage in (b"", b"VGP2", good[:-1], bytes(flipped), b"\xff" * len(good)):
        (tmp_path / "permits.bin").write_bytes(damage)
        board("reboot", False)
        sync_now(board, START + 5)
        assert wire.reason_name(board("check", permit(START), wire.ACTION_RENT, 0)["reason"]) == "store_lost"
    assert ["permit_store_lost"] in [r[1] for r in board("records", wire.LOG_ALARM)]
    mp_worker.call("simboard", "recover", board.name)
    assert board("use", permit(START), wire.ACTION_RENT, 0) == wire.OK


@pytest.mark.parametrize("tick_ms", [999, 1002, 1500, 10000])
def test_the_clock_keeps_time_at_any_tick_rate(mp_worker, board, tick_ms):
    assert sync_now(board, START) == wire.OK
    st = mp_worker.call("simboard", "advance_ms", board.name, 600_000, tick_ms)
    assert st["now"] == START + 600 and st["run_s"] >= 600


def test_a_time_sync_under_the_previous_key_is_refused(mp_worker, tmp_path):
    new = keys.derive_device_key(MASTER, DEVICE, 2)
    s = store(key=new.hex(), key_ver=2, key_old=KEY.hex(), key_old_v=1, key_old_x=(START + 86400) // 16)
    name = f"rot{next(_names)}"
    mp_worker.call("simboard", "new", name, _board_file(tmp_path, False), str(tmp_path), s)
    nonce = bytes.fromhex(mp_worker.call("simboard", "begin_sync", name))
    assert mp_worker.call("simboard", "sync", name, commands.time_sync(START, nonce, KEY, 1).hex()) == wire.UNKNOWN_KEY
    assert mp_worker.call("simboard", "sync", name, commands.time_sync(START, nonce, new, 2).hex()) == wire.OK
    # permits under the old key still verify during the overlap
    assert mp_worker.call("simboard", "use", name, permit(START), wire.ACTION_RENT, 0) == wire.OK


def test_full_permit_stores_cost_no_more_heap_than_empty_ones(board):
    sync_now(board, START)
    tokens = [permit(START, cti=i.to_bytes(8, "big")) for i in range(128)]
    got = board("store_heap", tokens)
    assert got["counts"] == [128, 0, 64]
    assert got["full"] - got["empty"] < 256  # fixed tables: nothing per entry
    assert got["save"] < 1024  # written straight from the tables (the dict store took 337 KB)
