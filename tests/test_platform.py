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
    assert refusals.count("sync_replayed") == 2 and "sync_bad_mac" in refusals and "sync_expired" in refusals


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
    board("advance", 3700)
    assert board("prune") == 1 and board("counts")[2] == 1  # the permit's entry, not the user's


def test_used_store_fails_closed_when_full(board):
    sync_now(board, START)
    for i in range(256):
        assert board("use", permit(START, cti=i.to_bytes(8, "big")), wire.ACTION_RENT, 0) == wire.OK
    assert board("use", permit(START, cti=b"\xff" * 8), wire.ACTION_RENT, 0) == wire.STORE_FULL
    many = permit(START, cti=b"\xfe" * 8, single_use=False)
    assert board("use", many, wire.ACTION_RENT, 0) == wire.OK  # needs no room
    board("advance", 3700)  # all expired: room again
    assert board("use", permit(START + 3700, cti=b"\xfd" * 8), wire.ACTION_RENT, 0) == wire.OK


def test_every_verdict_is_logged_with_its_reason(board):
    sync_now(board, START)
    board("check", permit(START), wire.ACTION_RENT, 0)
    board("check", permit(START, expires=START - 120, not_before=START - 300, issued_at=START - 300), wire.ACTION_RENT, 0)
    board("check", "00", wire.ACTION_RENT, 0)
    logged = [r[1][0] for r in board("records", wire.LOG_PERMIT)]
    assert logged == [wire.OK, wire.EXPIRED, wire.MALFORMED]


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
