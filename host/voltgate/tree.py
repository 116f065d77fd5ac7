"""Where the firmware and protocol sources are, and loading protocol modules by path.

The host ships the same protocol/ and firmware/ files it compiles for boards.
In a checkout (editable install) they sit two levels above this package;
VOLTGATE_TREE overrides that.
"""

import importlib
import os
import sys
from pathlib import Path

from .errors import EXIT_ENVIRONMENT, VoltgateError


def root() -> Path:
    env = os.environ.get("VOLTGATE_TREE")
    base = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (base / "protocol" / "wire.py").is_file():
        raise VoltgateError(
            f"no voltgate source tree at {base}",
            "set VOLTGATE_TREE to the repository root",
            EXIT_ENVIRONMENT,
        )
    return base


def protocol_dir() -> Path:
    return root() / "protocol"


def firmware_dir() -> Path:
    return root() / "firmware"


def boards_dir() -> Path:
    return root() / "boards"


def vectors_dir() -> Path:
    return protocol_dir() / "vectors"


BOARD_MODULES = ("wire", "cbor", "hmac256", "permit", "command", "framing")


def board_modules():
    """The board's protocol modules, imported once for host use.

    They import each other by their board names (`import wire`); they are
    imported with protocol/ on sys.path for that moment only, then kept
    under `voltgate._board.<name>`, so the host shares the board's code
    without its module names leaking into sys.path or sys.modules."""
    import types

    cached = sys.modules.get("voltgate._board")
    if cached is not None:
        return cached
    saved = {n: sys.modules.pop(n) for n in BOARD_MODULES if n in sys.modules}
    sys.path.insert(0, str(protocol_dir()))
    try:
        mods = {n: importlib.import_module(n) for n in BOARD_MODULES}
    finally:
        sys.path.remove(str(protocol_dir()))
        for n in BOARD_MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    ns = types.ModuleType("voltgate._board")
    for n, m in mods.items():
        setattr(ns, n, m)
        sys.modules[f"voltgate._board.{n}"] = m
    sys.modules["voltgate._board"] = ns
    return ns
