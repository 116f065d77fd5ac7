"""Hardware layer: the handful of objects the logic uses instead of `machine`.

Two implementations build the same objects from a board file (boards/):
`hal.esp32` on machine/esp32 (thin, checked against the ESP32 MicroPython
stubs) and `hal.sim` (deterministic, with a physics model and fault
injection, for the unix port). Logic never imports `machine`.

    hw = hal.esp32.make(board)   # or hal.sim.make(board, root)

hw has:
  hw.kind                 "station" or "outlet"
  hw.slots[i]             station: .presence .door (In), .lock .charger (Out),
                          .voltage .current .temperature (Analog), .identity (Ident)
  hw.outlets[i]           outlet: .relay (Out), .meter (Meter)
  hw.status_led           Out or None
  hw.wdt                  Watchdog: .start(timeout_ms) then .feed()
  hw.rtc                  RTC: .now() -> Unix seconds or None if not set, .set(t)
  hw.ext_rtc              RTC or None (battery-backed chip from the board file)
  hw.store                Store (persistent key/value, NVS on the ESP32)
  hw.root                 filesystem root for the log and state files ("/" on a board)
  hw.ticks_ms()           monotonic milliseconds (wraps as time.ticks_ms)
  hw.ticks_diff(a, b)     a - b for two ticks_ms values, wrap-aware
  hw.ticks_add(a, ms)     a + ms as a ticks_ms value, wrap-aware
  await hw.sleep_ms(ms)   what tasks sleep on (asyncio.sleep_ms on the board;
                          simulated time that tests advance in hal.sim)
  hw.reset()              hard reset (the sim raises SystemExit)
  hw.safe()               every relay, lock and charger output off

Objects (duck-typed; each raises OSError naming the part when it is absent
or fails):
  Out       .on() .off() .value() -> 0/1 as commanded (active_low handled)
  In        .value() -> 0/1 (active_low handled)
  Analog    .read() -> int in mV, mA or 0.1 degC after calibration;
            OSError(EIO) when the sensor reads open or shorted
  Meter     .pulses() -> energy pulses since boot, .power_mw(), .voltage_mv(),
            .current_ma(), .mwh_per_pulse
  Ident     .read() -> battery id (bytes) or None if no battery answers;
            .state() -> dict with "mv", "ma", "dc", "soc", "soh", "cycles"
            where the battery reports them (a smart battery), else {}
  Store     .get(key) -> bytes or None, .set(key, bytes), .get_int(key, default),
            .set_int(key, n), .delete(key), .commit(); keys <= 15 chars (NVS);
            only blobs and i32 (esp32.NVS cannot read NVS strings)
"""
