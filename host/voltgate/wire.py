"""The wire constants of protocol/wire.py, for host code.

The very module the boards run (voltgate.tree.board_modules), so the two
cannot drift apart.
"""

from . import tree

_w = tree.board_modules().wire

globals().update({k: v for k, v in vars(_w).items() if k.isupper()})
reason_name = _w.reason_name
json_form = _w.json_form
REASON_CODES = {name: code for code, name in enumerate(_w.REASON_NAMES)}
ACTION_CODES = {name: code for code, name in enumerate(_w.ACTION_NAMES) if name}
