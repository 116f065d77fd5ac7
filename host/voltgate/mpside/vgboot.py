# Runs on MicroPython: one boot of a simulated board (voltgate.simboard).
# The flash folder (env VGSIM_FLASH) becomes the filesystem root, as a
# board's flash is, with the board's module path ("", ".frozen", "/lib").
#   argv[1] "main": run /main.py if the flash has one, as a board does at
#       power-up and after a soft reset in the friendly REPL; exit status 0
#       when it ends (the simulator then starts the REPL), vgmachine.RESET
#       when it asked for a reset (machine.reset(), hal.sim's reset, any
#       SystemExit: the simulator boots again).
#   argv[1] "repl": only the root; run with `micropython -i`, the REPL follows.
import os
import sys

import vfs
import vgmachine



class Flash:
    """VfsPosix on the flash folder, with one fix: this port's VfsPosix
    fails a rename whose two paths are both absolute (it builds both in
    one buffer); the new path is given relative to the current folder."""

    def __init__(self, root):
        self._v = v = vfs.VfsPosix(root)
        for name in ("mount", "umount", "ilistdir", "chdir", "getcwd", "mkdir", "remove", "rmdir", "stat", "statvfs", "open"):
            setattr(self, name, getattr(v, name))

    def rename(self, old, new):
        if old[:1] == "/" and new[:1] == "/":
            cwd = self._v.getcwd()
            new = "../" * (cwd.count("/") if cwd != "/" else 0) + new[1:]
        return self._v.rename(old, new)


sys.modules["machine"] = vgmachine
vfs.umount("/")
vfs.mount(Flash(os.getenv("VGSIM_FLASH")), "/")
os.chdir("/")
sys.path[:] = ["", ".frozen", "/lib"]


def _main():
    try:
        with open("main.py") as f:
            code = f.read()
    except OSError:
        return 0  # no main.py: straight to the REPL
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit:
        return vgmachine.RESET
    except BaseException as e:  # KeyboardInterrupt (Ctrl-C) too: the REPL takes over
        sys.print_exception(e)
    return 0


if sys.argv[1] == "main":
    sys.exit(_main())
del _main, Flash
