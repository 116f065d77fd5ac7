# Runs on MicroPython and CPython: functions the harness tests call.
import sys


def implementation():
    return sys.implementation.name


def echo(x):
    return x


def fail(msg):
    raise ValueError(msg)


def noisy(n):
    """Write n bytes to stderr (as the unix port's warnings do), return n."""
    line = "x" * 99 + "\n"
    for _ in range(n // 100):
        sys.stderr.write(line)
    return n


def chatty(n):
    """print() n lines, as firmware writing to its console does."""
    for i in range(n):
        print("console line", i)
    return n


def huge(n):
    """A result too big to serialise in a small heap."""
    return ["x" * 100] * n
