"""voltgate: host software for battery-swap stations and permit-gated outlets.

Library first; the `voltgate` command (voltgate.cli) only parses and calls.
"""

__version__ = "0.1.0"
