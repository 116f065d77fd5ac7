"""Board files (boards/*.json, format 1): load, validate, list.

The format and its rules are written in boards/README.md; this module is
their executable form. The schema below is data: one table of allowed keys
and value types per object (a trailing `?` marks an optional key), walked
once over the document. The walk reports type, range and unknown-key
problems where it finds them and collects every GPIO, expander pin, bus
reference and I2C device it meets; the board-wide rules (duplicates, ESP32
pin rules, address collisions) run over those collections afterwards.

    report = validate("boards/station-4-devkitc.json")
    report.errors, report.warnings     # "<file>: <key path>: <problem>"
    warnings = check(path)             # provisioning: raises BoardError on errors
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tree
from .errors import EXIT_ENVIRONMENT, EXIT_USAGE, VoltgateError

FORMAT = 1

# ESP32 (ESP32-D0WD, as on the DevKitC) pin facts, from the ESP32 datasheet.
ESP32_GPIOS = frozenset([*range(0, 20), 21, 22, 23, 25, 26, 27, *range(32, 40)])
FLASH = range(6, 12)
INPUT_ONLY = range(34, 40)
ADC1 = range(32, 40)
STRAPPING = {
    0: "low at reset starts the ROM download mode",
    2: "must be low or floating at reset for the download mode",
    5: "sets the SDIO slave timing at reset",
    12: "sets the flash voltage at reset: pulled high, a 3.3 V flash does not boot",
    15: "low at reset silences the boot log",
}
# UART pins MicroPython uses when the board file gives none (TX, RX).
UART_DEFAULT_PINS = {0: (1, 3), 1: (10, 9), 2: (17, 16)}
SMBUS_MAX_HZ = 100_000
I2C_DEFAULT_HZ = 400_000  # what hal/esp32.py uses when a bus has no "freq"


class BoardError(VoltgateError):
    """A board file that cannot be used; .messages has one line per problem."""

    def __init__(self, problem, hint=None, exit_code=EXIT_USAGE, messages=()):
        super().__init__(problem, hint, exit_code)
        self.messages = list(messages) or [problem]


@dataclass
class Report:
    file: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    board: dict | None = None  # the parsed document, None when it is not JSON

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"file": self.file, "valid": self.ok, "errors": self.errors, "warnings": self.warnings}


# --- loading -----------------------------------------------------------------


class _DupObject(dict):
    """A JSON object that had a key more than once (json keeps the last)."""

    duplicates: tuple = ()


def _object(pairs):
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    seen, dups = set(), []
    for k, _ in pairs:
        if k in seen and k not in dups:
            dups.append(k)
        seen.add(k)
    d = _DupObject(d)
    d.duplicates = tuple(dups)
    return d


def label(path) -> str:
    """How messages name a file: relative to the working directory when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load(path) -> dict:
    """Parse a board file. BoardError (exit 2) for bad JSON, naming file, line and column;
    BoardError (exit 3) when the file cannot be read."""
    path = Path(path)
    name = label(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BoardError(f"no board file {name}", "voltgate boards list shows the board files", EXIT_ENVIRONMENT) from None
    except OSError as e:
        raise BoardError(f"cannot read {name}: {e.strerror}", None, EXIT_ENVIRONMENT) from None
    except UnicodeDecodeError as e:
        raise BoardError(f"{name}: byte {e.start}: not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise BoardError(f"{name}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None


def default_files() -> list[Path]:
    """Every board file in the tree's boards/ folder, by name."""
    return sorted(tree.boards_dir().glob("*.json"))


# --- the schema language -----------------------------------------------------


def _join(key, sub):
    return f"{key}.{sub}" if key else str(sub)


def _show(v) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    return json.dumps(v)


def _is_int(v):
    return type(v) is int


def _is_num(v):
    return type(v) in (int, float)


def _plural(n, word, plural=None):
    return f"{n} {word if n == 1 else plural or word + 's'}"


@dataclass
class _Use:
    value: Any  # a GPIO number, or (expander, pin)
    role: str  # "in", "out", "io" (open drain: needs an output), "adc"
    key: str
    by: str  # how a duplicate names this use


class _Ctx:
    """What one walk collects: problems, and the uses board-wide rules look at."""

    def __init__(self, chip):
        self.chip = chip
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.gpios: list[_Use] = []
        self.expander_pins: list[_Use] = []
        self.refs: list[tuple[str, str, str | None, str]] = []  # registry, name, wanted type, key
        self.defined: dict[str, dict] = {"buses": {}, "expanders": {}}
        self.i2c: list[dict] = []

    def error(self, key, problem):
        self.errors.append((key, problem))

    def warn(self, key, problem):
        self.warnings.append((key, problem))


class Spec:
    def check(self, v, key, cx: _Ctx):
        raise NotImplementedError


class Skip(Spec):
    """Allowed, not checked (the part of a board whose kind is unknown)."""

    def check(self, v, key, cx):
        pass


class Forbidden(Spec):
    def __init__(self, reason):
        self.reason = reason

    def check(self, v, key, cx):
        cx.error(key, self.reason)


class Int(Spec):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def check(self, v, key, cx):
        if not _is_int(v):
            cx.error(key, f"expected an integer, got {_show(v)}")
        elif not self.lo <= v <= self.hi:
            cx.error(key, f"{v} is out of range ({self.lo}..{self.hi})")


class Num(Spec):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def check(self, v, key, cx):
        if not _is_num(v) or not math.isfinite(v):
            cx.error(key, f"expected a number, got {_show(v)}")
        elif not self.lo <= v <= self.hi:
            cx.error(key, f"{v} is out of range ({self.lo}..{self.hi})")


class Bool(Spec):
    def check(self, v, key, cx):
        if type(v) is not bool:
            cx.error(key, f"expected true or false, got {_show(v)}")


class Str(Spec):
    def __init__(self, pattern=None, what=None):
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what

    def check(self, v, key, cx):
        if not isinstance(v, str):
            cx.error(key, f"expected a string, got {_show(v)}")
        elif self.pattern and not self.pattern.fullmatch(v):
            cx.error(key, f"{_show(v)} is not {self.what}")


class Enum(Spec):
    def __init__(self, *values):
        self.values = values

    def check(self, v, key, cx):
        if v in self.values and type(v) is type(self.values[0]):
            return
        if len(self.values) == 1:
            cx.error(key, f"expected {_show(self.values[0])}, got {_show(v)}")
        else:
            cx.error(key, f"expected one of {', '.join(map(_show, self.values))}, got {_show(v)}")


class Obj(Spec):
    """An object with exactly these keys ("name?" = optional); post(v, key, cx) runs after the keys."""

    def __init__(self, fields: dict, post=None):
        self.fields = {k.rstrip("?"): s for k, s in fields.items()}
        self.required = [k for k in fields if not k.endswith("?")]
        self.post = post

    def check(self, v, key, cx):
        if not isinstance(v, dict):
            cx.error(key, f"expected an object, got {_show(v)}")
            return
        for k in getattr(v, "duplicates", ()):
            cx.error(_join(key, k), "key appears more than once (JSON keeps only the last)")
        for k, sub in v.items():
            spec = self.fields.get(k)
            if spec is None:
                near = difflib.get_close_matches(k, [f for f, s in self.fields.items() if not isinstance(s, Forbidden)], 1)
                cx.error(_join(key, k), "unknown key" + (f' (did you mean "{near[0]}"?)' if near else ""))
            else:
                spec.check(sub, _join(key, k), cx)
        for k in self.required:
            if k not in v:
                cx.error(_join(key, k), "required key is missing")
        if self.post:
            self.post(v, key, cx)


class List(Spec):
    def __init__(self, item: Spec, lo, hi):
        self.item, self.lo, self.hi = item, lo, hi

    def check(self, v, key, cx):
        if not isinstance(v, list):
            cx.error(key, f"expected a list, got {_show(v)}")
            return
        if not self.lo <= len(v) <= self.hi:
            cx.error(key, f"{_plural(len(v), 'entry', 'entries')}, expected {self.lo}..{self.hi}")
        for i, x in enumerate(v):
            self.item.check(x, f"{key}[{i}]", cx)


NAME_RE = "[a-z][a-z0-9_]*"


class Map(Spec):
    """Named objects (buses, expanders); the names go into cx.defined[registry]."""

    def __init__(self, value: Spec, registry, post=None):
        self.value, self.registry, self.post = value, registry, post

    def check(self, v, key, cx):
        if not isinstance(v, dict):
            cx.error(key, f"expected an object, got {_show(v)}")
            return
        for name, sub in v.items():
            if not re.fullmatch(NAME_RE, name):
                cx.error(_join(key, name), "not a valid name (a lowercase letter, then lowercase letters, digits or _)")
            cx.defined[self.registry][name] = sub
            self.value.check(sub, _join(key, name), cx)
        if self.post:
            self.post(v, key, cx)


class Tagged(Spec):
    """An object whose `tag` key picks its schema (buses by "type")."""

    def __init__(self, tag, variants: dict):
        self.tag, self.variants = tag, variants

    def check(self, v, key, cx):
        if not isinstance(v, dict):
            cx.error(key, f"expected an object, got {_show(v)}")
        elif self.tag not in v:
            cx.error(_join(key, self.tag), "required key is missing")
        elif not isinstance(v[self.tag], str) or v[self.tag] not in self.variants:
            Enum(*self.variants).check(v[self.tag], _join(key, self.tag), cx)
        else:
            self.variants[v[self.tag]].check(v, key, cx)


class Choice(Spec):
    """One of several objects, told apart by which key they have; `default` when none."""

    def __init__(self, variants: dict, default: Spec | None = None):
        self.variants, self.default = variants, default

    def check(self, v, key, cx):
        if not isinstance(v, dict):
            cx.error(key, f"expected an object, got {_show(v)}")
            return
        present = [k for k in self.variants if k in v]
        names = " or ".join(f'"{k}"' for k in self.variants)
        if len(present) > 1:
            cx.error(key, f"use {names}, not both")
        elif present:
            self.variants[present[0]].check(v, key, cx)
        elif self.default:
            self.default.check(v, key, cx)
        else:
            cx.error(key, f"needs {names}")


class Nullable(Spec):
    def __init__(self, spec):
        self.spec = spec

    def check(self, v, key, cx):
        if v is not None:
            self.spec.check(v, key, cx)


class Gpio(Spec):
    """A chip GPIO number used as `role`; the pin rules run on all of them at the end."""

    def __init__(self, role):
        self.role = role

    def check(self, v, key, cx):
        if not _is_int(v) or v < 0:
            cx.error(key, f"expected a GPIO number, got {_show(v)}")
        else:
            cx.gpios.append(_Use(v, self.role, key, key))


class Ref(Spec):
    """The name of a bus or expander (of `type` when given), resolved at the end."""

    def __init__(self, registry, type=None):
        self.registry, self.type = registry, type

    def check(self, v, key, cx):
        if not isinstance(v, str):
            cx.error(key, f"expected a name, got {_show(v)}")
        else:
            cx.refs.append((self.registry, v, self.type, key))


# --- hooks for the few rules that span sibling keys --------------------------


def _expander_pin(v, key, cx):
    exp, pin = v.get("expander"), v.get("pin")
    if isinstance(exp, str) and _is_int(pin) and 0 <= pin <= 15:
        cx.expander_pins.append(_Use((exp, pin), "io", _join(key, "pin"), _join(key, "pin")))


def _i2c_device(v, key, cx):
    """Record an I2C device (and the mux in front of it) for the address rules."""
    bus, addr, mux = v.get("bus"), v.get("addr"), v.get("mux")
    if not isinstance(bus, str) or not _is_int(addr):
        return
    segment = None
    if isinstance(mux, dict) and _is_int(mux.get("addr")) and _is_int(mux.get("channel")):
        segment = (mux["addr"], mux["channel"])
        cx.i2c.append({"bus": bus, "addr": mux["addr"], "segment": None, "key": _join(key, "mux"), "mux": True, "bms": False})
    elif mux is not None:
        return
    cx.i2c.append({"bus": bus, "addr": addr, "segment": segment, "key": key, "mux": False, "bms": key.endswith(".bms")})


def _serial_pins(v, key, cx):
    """UART pins the board file leaves to MicroPython's defaults still take their GPIOs."""
    uart = v.get("uart")
    if cx.chip != "esp32" or not _is_int(uart) or uart not in UART_DEFAULT_PINS:
        return
    missing = [(name, pin, role) for name, pin, role in zip(("tx", "rx"), UART_DEFAULT_PINS[uart], ("out", "in")) if name not in v]
    if uart == 1 and missing:
        cx.error(_join(key, "uart"), 'UART1\'s default pins are flash pins (GPIO 10, 9): set "tx" and "rx"')
        return
    for name, pin, role in missing:
        cx.gpios.append(_Use(pin, role, _join(key, "uart"), f"{key} (UART{uart} {name.upper()})"))


def _slot(v, key, cx):
    smart = isinstance(v.get("identity"), dict) and "bms" in v["identity"]
    for name in ("voltage", "current", "temperature"):
        sensor = v.get(name)
        if isinstance(sensor, dict) and "bms" in sensor and not smart:
            cx.error(_join(key, f"{name}.bms"), "the slot's identity is not a smart battery (identity.bms)")


def _ntc(v, key, cx):
    if "ntc" in v:
        for k in ("scale", "offset"):
            if k in v:
                cx.error(_join(key, k), "an NTC sensor is calibrated by its ntc curve, not scale/offset")


def _bl0937(v, key, cx):
    mw, mwh = v.get("mw_per_hz"), v.get("mwh_per_pulse")
    if _is_num(mw) and _is_num(mwh) and mw > 0 and mwh > 0:
        want = mw / 3600  # a CF pulse carries mw_per_hz millijoules
        if abs(mwh - want) > 0.01 * want:
            cx.error(_join(key, "mwh_per_pulse"), f"{mwh} does not match mw_per_hz / 3600 = {want:.4g}")


def _bus_ids(v, key, cx):
    seen = {}
    for name, bus in v.items():
        if isinstance(bus, dict) and bus.get("type") == "i2c" and _is_int(bus.get("id")):
            if bus["id"] in seen:
                cx.error(_join(key, f"{name}.id"), f"I2C controller {bus['id']} is already {_join(key, seen[bus['id']])}")
            seen.setdefault(bus["id"], name)


def _ordered(*chains):
    """In each chain of numeric keys, each present key below the next present one."""

    def post(v, key, cx):
        for chain in chains:
            present = [k for k in chain if _is_num(v.get(k))]
            for lo, hi in zip(present, present[1:]):
                if not v[lo] < v[hi]:
                    cx.error(_join(key, lo), f"must be below {hi} ({v[hi]})")

    return post


# --- the schema ----------------------------------------------------------------


def digital(role):
    """presence, door (in); lock, charger, relay, status_led (out)."""
    return Choice(
        {"expander": Obj({"expander": Ref("expanders"), "pin": Int(0, 15), "active_low?": Bool()}, post=_expander_pin)},
        default=Obj({"pin": Gpio(role), "active_low?": Bool()}),
    )


BMS_SENSOR = Obj({"bms": Enum("bms")})
LINEAR = {"adc": Gpio("adc"), "scale?": Num(-1e6, 1e6), "offset?": Num(-1e6, 1e6)}  # raw * scale + offset
NTC = Obj({"r25": Num(100, 1e6), "beta": Num(1000, 10000), "r_series": Num(100, 1e6)})
ANALOG = Choice({"adc": Obj(LINEAR), "bms": BMS_SENSOR})
TEMPERATURE = Choice({"adc": Obj({**LINEAR, "ntc?": NTC}, post=_ntc), "bms": BMS_SENSOR})
I2C_ADDR = Int(8, 119)  # 7-bit, without the reserved 0-7 and 120-127
MUX = Obj({"addr": Int(112, 119), "channel": Int(0, 7)})  # TCA9548A
IDENTITY = Choice(
    {
        "bus": Obj({"bus": Ref("buses", "onewire")}),
        "bms": Obj({"bms": Obj({"bus": Ref("buses", "i2c"), "addr": I2C_ADDR, "mux?": MUX}, post=_i2c_device)}),
    }
)
SLOT = Obj(
    {
        "presence": digital("in"),
        "door": digital("in"),
        "lock": digital("out"),
        "charger": digital("out"),
        "voltage": ANALOG,
        "current": ANALOG,
        "temperature": TEMPERATURE,
        "identity": IDENTITY,
    },
    post=_slot,
)
CALIBRATION = Num(1e-6, 1e6)
METER = Tagged(
    "type",
    {
        "bl0937": Obj(
            {
                "type": Enum("bl0937"),
                "cf": Gpio("in"),
                "cf1": Gpio("in"),
                "sel": Gpio("out"),
                "mw_per_hz": CALIBRATION,
                "mv_per_hz": CALIBRATION,
                "ma_per_hz": CALIBRATION,
                "mwh_per_pulse": CALIBRATION,
            },
            post=_bl0937,
        )
    },
)
OUTLET = Obj({"relay": digital("out"), "meter": METER})
BUS = Tagged(
    "type",
    {
        "i2c": Obj({"type": Enum("i2c"), "id": Int(0, 1), "sda": Gpio("io"), "scl": Gpio("io"), "freq?": Int(10_000, 1_000_000)}),
        "onewire": Obj({"type": Enum("onewire"), "pin": Gpio("io")}),
    },
)
EXPANDER = Tagged("type", {"mcp23017": Obj({"type": Enum("mcp23017"), "bus": Ref("buses", "i2c"), "addr": Int(32, 39)}, post=_i2c_device)})
RTC = Tagged("type", {"ds3231": Obj({"type": Enum("ds3231"), "bus": Ref("buses", "i2c"), "addr": Enum(104)}, post=_i2c_device)})
LINK = Obj(
    {
        "serial?": Obj({"uart": Int(0, 2), "baud?": Int(1200, 5_000_000), "tx?": Gpio("out"), "rx?": Gpio("in")}, post=_serial_pins),
        "mqtt?": Obj({"keepalive_s?": Int(5, 65535)}),
    }
)
STATION_LIMITS = Obj(
    {
        "charge_timeout_s?": Int(60, 86400),
        "door_timeout_s?": Int(5, 3600),
        "under_temp_dc?": Int(-400, 600),
        "over_temp_dc?": Int(0, 1000),
        "over_voltage_mv?": Int(1000, 100_000),
        "over_current_ma?": Int(100, 100_000),
    },
    post=_ordered(("under_temp_dc", "over_temp_dc")),
)
OUTLET_LIMITS = Obj(
    {"over_current_ma?": Int(100, 32_000), "over_power_mw?": Int(1000, 8_000_000), "over_voltage_mv?": Int(100_000, 300_000)}
)
BATTERY_ID = Str("(?:[0-9a-fA-F]{2}){1,16}", "a battery id (1 to 16 bytes in hex)")
# What firmware/hal/sim.py reads from board["sim"]: flat keys, each with a default there.
SIM_CLOCK = {"start_unix?": Int(0, 0xFFFFFFFF)}
STATION_SIM = Obj(
    {
        "capacity_mah?": Int(100, 200_000),
        "empty_mv?": Int(1000, 100_000),
        "full_mv?": Int(1000, 100_000),
        "charge_ma?": Int(0, 100_000),
        "term_ma?": Int(0, 100_000),
        "r_int_mohm?": Int(1, 10_000),
        "ambient_dc?": Int(-400, 600),
        "thermal_dc_per_w?": Num(0, 1000),
        "thermal_tau_s?": Num(1, 100_000),
        "batteries?": List(Nullable(Obj({"id": BATTERY_ID, "soc?": Num(0, 1)})), 2, 16),
        **SIM_CLOCK,
    },
    post=_ordered(("empty_mv", "full_mv"), ("term_ma", "charge_ma")),
)
OUTLET_SIM = Obj({"mains_mv?": Int(90_000, 264_000), "load_w?": Num(0, 10_000), "loads?": List(Num(0, 10_000), 1, 8), **SIM_CLOCK})

COMMON = {
    "format": Enum(FORMAT),
    "name": Str("[a-z0-9][a-z0-9-]*", "a board name (lowercase letters, digits and -)"),
    "kind": Enum("station", "outlet"),
    "chip": Enum("esp32", "sim"),
    "module?": Str(),
    "notes?": Str(),
    "micropython": Str(r"\d+\.\d+(\.\d+)?", "a MicroPython version like 1.29"),
    "hal": Enum("esp32", "sim"),
    "buses?": Map(BUS, "buses", post=_bus_ids),
    "expanders?": Map(EXPANDER, "expanders"),
    "rtc?": RTC,
    "status_led?": digital("out"),
    "watchdog_ms?": Int(1000, 60_000),
    "link?": LINK,
}
KINDS = {
    "station": {"slots": List(SLOT, 2, 16), "outlets?": Forbidden("only an outlet board has outlets"), "limits?": STATION_LIMITS},
    "outlet": {"outlets": List(OUTLET, 1, 8), "slots?": Forbidden("only a station board has slots"), "limits?": OUTLET_LIMITS},
}
SIMS = {"station": STATION_SIM, "outlet": OUTLET_SIM}


def schema(doc) -> Obj:
    """The top-level schema for this document's kind and hal (unknown kind: those parts unchecked)."""
    kind, hal = doc.get("kind"), doc.get("hal")
    fields = dict(COMMON)
    if isinstance(kind, str) and kind in KINDS:
        fields.update(KINDS[kind])
        if hal == "sim":
            fields["sim"] = SIMS[kind]
        elif hal == "esp32":
            fields["sim?"] = Forbidden('only a board with hal "sim" has physics parameters')
        else:
            fields["sim?"] = Skip()
    else:
        fields.update({"slots?": Skip(), "outlets?": Skip(), "limits?": Skip(), "sim?": Skip()})
    return Obj(fields, post=_top)


def _top(v, key, cx):
    hal, sim = v.get("hal"), v.get("sim")
    if hal == "esp32" and v.get("chip") == "sim":
        cx.error("hal", 'the esp32 hardware layer needs chip "esp32"')
    if hal == "sim" and isinstance(sim, dict):
        for part, model, what in (("slots", "batteries", "one per slot, null for an empty one"), ("outlets", "loads", "one per outlet")):
            if isinstance(v.get(part), list) and isinstance(sim.get(model), list) and len(v[part]) != len(sim[model]):
                cx.error(f"sim.{model}", f"{_plural(len(sim[model]), 'entry', 'entries')}, expected {len(v[part])} ({what})")
        seen = {}
        for i, battery in enumerate(sim.get("batteries") if isinstance(sim.get("batteries"), list) else ()):
            bid = battery.get("id") if isinstance(battery, dict) else None
            if isinstance(bid, str):
                if bid.lower() in seen:
                    cx.error(f"sim.batteries[{i}].id", f"battery {bid} is already in sim.batteries[{seen[bid.lower()]}]")
                seen.setdefault(bid.lower(), i)
    if v.get("kind") == "station" and isinstance(v.get("slots"), list):
        owners = {}
        for i, slot in enumerate(v["slots"]):
            ident = slot.get("identity") if isinstance(slot, dict) else None
            bus = ident.get("bus") if isinstance(ident, dict) else None
            if isinstance(bus, str):
                if bus in owners:
                    problem = f"{bus} already identifies the battery in slots[{owners[bus]}] (one 1-Wire bus per slot)"
                    cx.error(f"slots[{i}].identity.bus", problem)
                owners.setdefault(bus, i)


# --- board-wide rules ----------------------------------------------------------


def _check_refs(cx: _Ctx, whole: bool):
    used: dict[str, set[str]] = {"buses": set(), "expanders": set()}
    for registry, name, want, key in cx.refs:
        defined = cx.defined[registry]
        noun = "bus" if registry == "buses" else "expander"
        if name not in defined:
            have = f"{registry}: {', '.join(defined)}" if defined else f"the board has no {registry}"
            cx.error(key, f'no {noun} named "{name}" ({have})')
            continue
        used[registry].add(name)
        kind = defined[name].get("type") if isinstance(defined[name], dict) else None
        if want and isinstance(kind, str) and kind in ("i2c", "onewire") and kind != want:
            cx.error(key, f'"{name}" is a {kind} bus, expected {want}')
    for registry, names in cx.defined.items():
        for name in names if whole else ():  # with the kind unknown, slots/outlets went unread
            if name not in used[registry]:
                cx.warn(f"{registry}.{name}", "not used by anything on the board")


def _check_gpios(cx: _Ctx):
    seen: dict = {}
    for u in cx.gpios:
        g = u.value
        if cx.chip == "esp32":
            if g not in ESP32_GPIOS and g not in FLASH:
                cx.error(u.key, f"GPIO {g} does not exist on the ESP32")
            elif g in FLASH:
                cx.error(u.key, f"GPIO {g} is wired to the SPI flash (GPIO 6-11)")
            elif u.role in ("out", "io") and g in INPUT_ONLY:
                cx.error(u.key, f"GPIO {g} is input-only")
            elif u.role == "adc" and g not in ADC1:
                cx.error(u.key, f"GPIO {g} is not an ADC1 pin (32-39; ADC2 does not work while Wi-Fi is on)")
            if g in STRAPPING:
                cx.warn(u.key, f"GPIO {g} is a strapping pin ({STRAPPING[g]})")
        if g in seen:
            cx.error(u.key, f"GPIO {g} is already used by {seen[g]}")
        seen.setdefault(g, u.by)
    seen = {}
    for u in cx.expander_pins:
        if u.value in seen:
            cx.error(u.key, f"{u.value[0]} pin {u.value[1]} is already used by {seen[u.value]}")
        seen.setdefault(u.value, u.by)


def _check_i2c(cx: _Ctx):
    buses = cx.defined["buses"]
    placed: list[dict] = []
    for d in cx.i2c:
        if d["bus"] not in buses:
            continue  # reported as an unknown bus
        for e in placed:
            same_segment = d["segment"] is None or e["segment"] is None or d["segment"] == e["segment"]
            if e["bus"] == d["bus"] and e["addr"] == d["addr"] and same_segment and not (d["mux"] and e["mux"]):
                where = d["bus"] if d["segment"] is None else f"{d['bus']} mux {d['segment'][0]} channel {d['segment'][1]}"
                cx.error(_join(d["key"], "addr"), f"I2C address {d['addr']} (0x{d['addr']:02x}) on {where} is already used by {e['key']}")
                break
        else:
            placed.append(d)
    for name in sorted({d["bus"] for d in cx.i2c if d["bms"]}):
        bus = buses.get(name)
        freq = bus.get("freq", I2C_DEFAULT_HZ) if isinstance(bus, dict) else None
        if type(freq) is int and freq > SMBUS_MAX_HZ:
            cx.warn(f"buses.{name}.freq", f"{freq} Hz is above SMBus's 100 kHz: the smart batteries on {name} may not answer")


# --- the API ---------------------------------------------------------------------


def validate(board, name: str | None = None) -> Report:
    """Check a board file (path) or a parsed board (dict) against format 1.

    `name` is how messages name the file (default: the path as label() gives it,
    or "<board>" for a dict); the board's `name` must equal its file stem, which
    is only checked when a path or a `name` is given."""
    if isinstance(board, (str, Path)):
        file = name or label(board)
        stem: str | None = Path(board).stem
        try:
            doc = load(board)
        except BoardError as e:
            if e.exit_code == EXIT_ENVIRONMENT:
                raise
            return Report(file, errors=[e.problem])
    else:
        doc, file = board, name or "<board>"
        stem = Path(name).stem if name else None

    def fmt(issue):
        key, problem = issue
        return f"{file}: {key}: {problem}" if key else f"{file}: {problem}"

    if not isinstance(doc, dict):
        return Report(file, errors=[fmt(("", f"expected a JSON object, got {_show(doc)}"))], board=None)
    cx = _Ctx(doc.get("chip"))
    schema(doc).check(doc, "", cx)
    if stem and isinstance(doc.get("name"), str) and doc["name"] != stem:
        cx.error("name", f'"{doc["name"]}" does not match the file name "{stem}"')
    _check_refs(cx, isinstance(doc.get("kind"), str) and doc["kind"] in KINDS)
    _check_gpios(cx)
    _check_i2c(cx)
    return Report(file, [fmt(e) for e in cx.errors], [fmt(w) for w in cx.warnings], doc)


def check(path) -> list[str]:
    """Provisioning's gate: BoardError with every message when the file has errors,
    else its warnings."""
    report = validate(path)
    if report.errors:
        if len(report.errors) == 1:
            problem = report.errors[0]
        else:
            problem = f"{report.file} has {len(report.errors)} errors:\n  " + "\n  ".join(report.errors)
        raise BoardError(problem, f"voltgate boards validate {report.file}", EXIT_USAGE, report.errors)
    return report.warnings


def summary(report: Report) -> dict:
    """One row of `voltgate boards list`: what the board is, and whether it validates."""
    doc = report.board if isinstance(report.board, dict) else {}

    def text(k):
        return doc.get(k) if isinstance(doc.get(k), str) else None

    def count(k):
        return len(doc[k]) if isinstance(doc.get(k), list) else None

    return {
        "file": report.file,
        "name": text("name"),
        "kind": text("kind"),
        "chip": text("chip"),
        "hal": text("hal"),
        "slots": count("slots"),
        "outlets": count("outlets"),
        "errors": len(report.errors),
        "warnings": len(report.warnings),
    }
