"""The MQTT broker side of the links: a private Mosquitto 2 for tests, the demo and the server.

From a device registry (site, device id, password per board) and the server's
credentials it writes three files into one directory: `mosquitto.conf` (one
loopback listener, no anonymous clients, client id forced to the username,
persistence so a restarted broker keeps QoS 1 sessions), `passwd` (mode 0600,
PBKDF2-SHA512 `$7$` hashes as mosquitto_passwd writes them) and `acl` (a board
may publish only its own `up` and `state` and read only its own `down`; the
server reads every `up`/`state` and writes every `down`). `Broker` runs
Mosquitto on that directory as a context manager.

Mosquitto 2.0 enforces the ACL quietly: a refused publish is acked (QoS 1,
MQTT 3.1.1; MQTT 5 gets PUBACK 0x87) or dropped (QoS 0) and never delivered,
and a refused subscription is granted but delivers nothing. Because the
username is the client id, one username is one connection: a second login
takes the first one's session over (so several server workers need several
usernames: BrokerConfig's server_users adds accounts with the server's ACL).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import EXIT_ENVIRONMENT, EXIT_USAGE, VoltgateError

SERVER_USER = "voltgate-server"
DEFAULT_HOST = "127.0.0.1"
LEAVES = ("up", "down", "state")
OFFLINE = b"offline"  # the retained state a board's last will publishes

# the password file format of Mosquitto 2 (mosquitto_passwd's defaults)
PW_ITERATIONS = 101
_PW_SALT_LEN = 12
_PW_PREFIX = "$7$"

CONF = "mosquitto.conf"
PASSWD = "passwd"
ACL = "acl"
DATA = "data"
LOG = "mosquitto.log"
OUT = "mosquitto.out"  # stdout/stderr: errors from before the log file is open
SERVER_PASSWORD = "server-password"  # the server user's password, beside the broker's files

# a site, device id or username: one topic level, one passwd/acl token
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_BIND_RETRIES = 5
_RUNNING = "running"  # mosquitto logs "mosquitto version X running" once its listeners are open
_IN_USE = "Address already in use"


def topic(site: str, device: str, leaf: str) -> str:
    """`vg/<site>/<device>/<leaf>`, leaf one of up (board to server), down, state."""
    if leaf not in LEAVES:
        raise ValueError(f"topic leaf must be one of {', '.join(LEAVES)}, got {leaf!r}")
    return f"vg/{site}/{device}/{leaf}"


def up(site: str, device: str) -> str:
    return topic(site, device, "up")


def down(site: str, device: str) -> str:
    return topic(site, device, "down")


def state(site: str, device: str) -> str:
    return topic(site, device, "state")


# -- password file ---------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> str:
    """A Mosquitto 2 password hash: `$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>`."""
    if salt is None:
        salt = secrets.token_bytes(_PW_SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{_PW_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches a `$7$` hash (as hash_password or mosquitto_passwd write it)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise ValueError("not a Mosquitto $7$ password hash")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        raise ValueError("malformed Mosquitto $7$ password hash") from None
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(got, expected)


def parse_passwd(text: str) -> dict[str, str]:
    """`username -> hash` from a Mosquitto password file (blank and # lines skipped)."""
    users = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise ValueError(f"password file line {n}: expected username:hash")
        users[user] = encoded
    return users


# -- configuration ---------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One board's broker account: it publishes and reads under vg/<site>/<device>/."""

    site: str
    device: str
    password: str = field(repr=False)

    def topic(self, leaf: str) -> str:
        return topic(self.site, self.device, leaf)


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VoltgateError(
            f"bad {what} {name!r}",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            EXIT_USAGE,
        )


@dataclass(frozen=True)
class BrokerConfig:
    """The registry as the broker sees it: one account per board plus the server's.

    server_users: more (username, password) accounts with the server's ACL,
    one per further server process (the broker forces client id = username,
    so two processes cannot share one). port 0 means: Broker picks a free
    loopback port when it starts."""

    devices: tuple[Device, ...]
    server_password: str = field(repr=False)
    server_user: str = SERVER_USER
    host: str = DEFAULT_HOST
    port: int = 0
    server_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self):
        devices = tuple(d if isinstance(d, Device) else Device(*d) for d in self.devices)
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "server_users", tuple((u, pw) for u, pw in self.server_users))
        _check_name("server username", self.server_user)
        seen = {self.server_user}
        for user, _ in self.server_users:
            _check_name("server username", user)
            if user in seen:
                raise VoltgateError(f"server username {user!r} appears twice", None, EXIT_USAGE)
            seen.add(user)
        for d in devices:
            _check_name("site", d.site)
            _check_name("device id", d.device)
            if d.device in seen:
                raise VoltgateError(f"device id {d.device!r} appears twice or is a server username", None, EXIT_USAGE)
            seen.add(d.device)
        if not 0 <= self.port <= 65535:
            raise VoltgateError(f"bad port {self.port}", None, EXIT_USAGE)

    def acl(self) -> str:
        lines = [
            "# voltgate.broker: each board writes only its own up/state and reads only its own down;",
            "# the server reads every up/state and writes every down. Nothing else is allowed.",
            "",
        ]
        for user in self.server_usernames:
            lines += [f"user {user}", "topic read vg/+/+/up", "topic read vg/+/+/state", "topic write vg/+/+/down", ""]
        lines.pop()
        for d in self.devices:
            lines += ["", f"user {d.device}", f"topic write {d.topic('up')}", f"topic write {d.topic('state')}", f"topic read {d.topic('down')}"]
        return "\n".join(lines) + "\n"

    @property
    def server_usernames(self) -> list[str]:
        """The server's account and the further server accounts."""
        return [self.server_user] + [u for u, _ in self.server_users]

    def passwd(self) -> str:
        users = [(self.server_user, self.server_password), *self.server_users] + [(d.device, d.password) for d in self.devices]
        return "".join(f"{user}:{hash_password(pw)}\n" for user, pw in users)

    def mosquitto_conf(self, directory: str | Path) -> str:
        d = Path(directory).resolve()
        for p in (d, d / DATA):
            if "\n" in str(p) or "\r" in str(p):
                raise VoltgateError(f"broker directory {str(d)!r} contains a line break", None, EXIT_USAGE)
        return "\n".join(
            [
                "# voltgate.broker: a private broker for voltgate boards (generated, do not edit)",
                f"listener {self.port} {self.host}",
                "allow_anonymous false",
                "use_username_as_clientid true",
                f"password_file {d / PASSWD}",
                f"acl_file {d / ACL}",
                # without it each QoS 1 request/reply waits ~40 ms on Nagle and delayed ACKs
                "set_tcp_nodelay true",
                "persistence true",
                f"persistence_location {d / DATA}",
                f"log_dest file {d / LOG}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "connection_messages true",
                # started as root, mosquitto would switch to its own user and
                # then could not read the 0600 passwd or write the data dir
                f"user {getpass.getuser()}",
                "",
            ]
        )

    def write(self, directory: str | Path) -> Path:
        """Write mosquitto.conf, passwd (0600) and acl into `directory`; return the conf path."""
        d = Path(directory)
        (d / DATA).mkdir(parents=True, exist_ok=True)
        pw = d / PASSWD
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file already existed
        with os.fdopen(fd, "w") as f:
            f.write(self.passwd())
        (d / ACL).write_text(self.acl())
        conf = d / CONF
        conf.write_text(self.mosquitto_conf(d))
        return conf


def server_password(directory: str | Path) -> str:
    """The server user's password kept in directory/server-password: made
    (random, mode 0600) when the file is missing, never overwritten."""
    path = Path(directory) / SERVER_PASSWORD
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def write_config(directory: str | Path, devices, server_password: str, **kw) -> BrokerConfig:
    """BrokerConfig(devices, server_password, **kw).write(directory); returns the config."""
    config = BrokerConfig(tuple(devices), server_password, **kw)
    config.write(directory)
    return config


def from_registry(devices, master: bytes, server_password: str, **kw) -> BrokerConfig:
    """The broker's view of a registry: devices are mappings with "device",
    "site" and "key_version" (default 1); each board's password is derived
    from its device key (keys.mqtt_password), so nothing but the master
    secret is needed to write the password file."""
    from . import keys

    out = []
    for d in devices:
        try:
            dev, site, ver = d["device"], d["site"], int(d.get("key_version", 1))
        except (KeyError, TypeError, ValueError):
            raise VoltgateError(f"bad registry entry {d!r}", 'each needs "device", "site" and optionally "key_version"', EXIT_USAGE) from None
        out.append(Device(site, dev, keys.mqtt_password(keys.derive_device_key(master, dev, ver))))
    return BrokerConfig(tuple(out), server_password, **kw)


# -- the broker process ----------------------------------------------------


def binary() -> str:
    """The mosquitto command: on PATH, else Debian's /usr/sbin/mosquitto."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise VoltgateError("the mosquitto broker is not installed", "make setup installs it", EXIT_ENVIRONMENT)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Broker:
    """A private Mosquitto on `directory`, configured from `config`.

    with Broker(config, tmp_path) as b:   # b.host, b.port, b.dir
        ...
    stop() then start() restarts it on the same port and directory (persisted
    sessions and retained messages survive)."""

    def __init__(self, config: BrokerConfig, directory: str | Path):
        self.config = config
        self.dir = Path(directory)
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def log(self) -> Path:
        return self.dir / LOG

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Broker:
        """Start mosquitto and return once it accepts connections.

        The first start with port 0 picks a free port, and picks again if
        another process takes it first; later starts reuse the port."""
        if self.running:
            return self
        exe = binary()
        pick = self.config.port == 0
        for _ in range(_BIND_RETRIES if pick else 1):
            config = replace(self.config, port=free_port(self.config.host)) if pick else self.config
            conf = config.write(self.dir)
            if self._launch(exe, conf, config):
                self.config = config
                return self
        raise VoltgateError(f"mosquitto could not bind a port on {self.config.host} after {_BIND_RETRIES} tries", f"see {self.log}", EXIT_ENVIRONMENT)

    def _launch(self, exe: str, conf: Path, config: BrokerConfig) -> bool:
        """Run mosquitto and wait until it is ready. False if its port was taken
        (only worth a retry on another port); raises on any other failure."""
        offset = (_size(self.log), _size(self.dir / OUT))
        with open(self.dir / OUT, "ab") as out:
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    text = self._log_since(offset)
                    self.proc = None
                    if _IN_USE in text:
                        return False
                    raise VoltgateError(f"mosquitto exited at start: {_last_line(text)}", f"see {self.dir}", EXIT_ENVIRONMENT)
                # the log line rules out a port someone else answers on
                if _RUNNING in self._log_since(offset) and _accepts(config.host, config.port):
                    return True
                time.sleep(0.01)  # poll interval, not synchronisation
            raise VoltgateError(f"mosquitto did not accept connections within {_START_TIMEOUT:.0f} s", f"see {self.log}", EXIT_ENVIRONMENT)
        except BaseException:
            self.stop()
            raise

    def _log_since(self, offset: tuple[int, int]) -> str:
        """What mosquitto wrote to its log and its stdout/stderr since `offset`."""
        return _read_from(self.log, offset[0]) + _read_from(self.dir / OUT, offset[1])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __repr__(self):
        return f"Broker({self.host}:{self.port}, {str(self.dir)!r}, {'running' if self.running else 'stopped'})"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"
