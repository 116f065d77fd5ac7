# Runs on MicroPython: `machine` for a simulated board (voltgate.simboard),
# installed as sys.modules["machine"] by vgboot.py. The unix port's machine
# has no reset(); here it ends the interpreter with RESET, which the
# simulator answers with a power-on boot (main.py runs again), as
# machine.reset() does on an ESP32.
from machine import *  # noqa: F401,F403 (the unix port's: idle, mem8, Signal, ...)

RESET = 77


def reset():
    raise SystemExit(RESET)


def reset_cause():
    return 1  # PWRON_RESET: the simulator does not tell one boot from another
