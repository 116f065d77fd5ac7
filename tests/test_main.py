"""The main loop on MicroPython with simulated hardware and simulated time:
safe outputs at boot, the watchdog fed only while tasks live, and a crash
logged to flash before a safe reset."""

import pytest

from voltgate import keys, tree, wire

BOARD = str(tree.boards_dir() / "station-4-devkitc.json")
STORE = {"dev_id": b"st-9".hex(), "key": keys.derive_device_key(bytes(32), "st-9", 1).hex(), "key_ver": 1}


def run(mp_worker, tmp_path, mode, seconds):
    return mp_worker.call("main_checks", "run", BOARD, str(tmp_path), STORE, mode, seconds)


def test_healthy_run_boots_safe_and_keeps_the_watchdog_fed(mp_worker, tmp_path):
    out = run(mp_worker, tmp_path, "ok", 30)
    assert out["charger1_at_boot"] is False  # left on before the boot, off before anything runs
    assert out["charger0_running"] is True
    assert out["ended"] == "returned" and not out["wdt_fired"] and out["ms"] >= 30000
    boot = [body for t, body in out["log"] if t == wire.LOG_BOOT]
    assert boot and boot[0][0] == out["epoch"] and boot[0][3] == []  # no problems


def test_a_hung_task_stops_the_watchdog_feed(mp_worker, tmp_path):
    out = run(mp_worker, tmp_path, "hang", 60)
    # the app stops checking in at 5 s; its limit is 3 s, the watchdog's 8 s
    assert out["wdt_fired"]
    assert 5000 + 3000 + 8000 - 1000 <= out["ms"] <= 5000 + 3000 + 8000 + 1000


def test_a_crash_is_logged_to_flash_and_the_outputs_go_safe(mp_worker, tmp_path):
    out = run(mp_worker, tmp_path, "crash", 30)
    assert out["ended"] == "reset"
    assert out["charger0_running"] is True and out["charger0_after"] is False
    errors = [body for t, body in out["log"] if t == wire.LOG_ERROR]
    assert len(errors) == 1 and errors[0][0] == "RuntimeError"
    # raised at the app's first wake-up at or after 3 s (tasks wake on 10 ms steps)
    assert 3000 <= int(errors[0][1].split()[2]) < 3100


def test_each_boot_gets_a_new_epoch_even_after_a_full_erase(mp_worker, tmp_path):
    seen = [run(mp_worker, tmp_path, "ok", 2)["epoch"] for _ in range(3)]
    assert len(set(seen)) == 3 and all(0 < e < 2**31 for e in seen)
    for f in tmp_path.rglob("*"):  # erase the flash: store, log, permit store
        if f.is_file():
            f.unlink()
    assert run(mp_worker, tmp_path, "ok", 2)["epoch"] not in seen


def test_an_app_that_hangs_before_it_ever_checks_in_is_watched(mp_worker, tmp_path):
    out = run(mp_worker, tmp_path, "hang_at_start", 60)
    assert out["wdt_fired"] and out["ms"] <= 3000 + 8000 + 1000  # its 3 s, then the watchdog's 8 s


def test_ctrl_c_leaves_the_outputs_off(mp_worker, tmp_path):
    out = run(mp_worker, tmp_path, "interrupt", 30)
    assert out["ended"] == "KeyboardInterrupt"
    assert out["charger0_running"] is True and out["charger0_after"] is False


def test_a_board_without_a_key_says_so_on_its_console_and_in_its_log(_mp_workers, mp_worker, tmp_path):
    store = {k: v for k, v in STORE.items() if k != "key"}
    out = mp_worker.call("main_checks", "run", BOARD, str(tmp_path), store, "ok", 2)
    boot = [body for t, body in out["log"] if t == wire.LOG_BOOT][0]
    assert boot[3] == ["no device key in the store (key): every permit is refused"]
    console = _mp_workers["main_checks"].console
    assert "voltgate: no device key in the store (key): every permit is refused" in console
