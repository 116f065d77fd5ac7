"""The one error type users see, printed as `voltgate: <command>: <problem> (<hint>)`."""

# Exit codes (documented in the README and `voltgate --help`)
EXIT_OK = 0
EXIT_FAILURE = 1  # the operation ran and failed (e.g. a permit was refused)
EXIT_USAGE = 2  # bad command line or bad input
EXIT_ENVIRONMENT = 3  # a tool, file or device the command needs is missing


class VoltgateError(Exception):
    def __init__(self, problem, hint=None, exit_code=EXIT_FAILURE):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint
        self.exit_code = exit_code

    def render(self, command):
        text = f"voltgate: {command}: {self.problem}"
        if self.hint:
            text += f" ({self.hint})"
        return text
