# Runs on MicroPython and CPython: functions the harness tests call.
import sys


def implementation():
    return sys.implementation.name


def echo(x):
    return x


def fail(msg):
    raise ValueError(msg)
