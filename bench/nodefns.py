"""The functions the benchmarks run as nodes: stdlib only, so they travel by value (cloudpickle)
into the node image, which has no copy of bench/."""

from __future__ import annotations


def noop():
    return 1


def square(x):
    return x * x


def echo(data):
    """A payload's round trip: the argument comes back as the result (same size both ways)."""
    return data


def nap(x, seconds=0.0):
    import time

    time.sleep(seconds)
    return x * x


def after(path, x, timeout=600.0):
    """Wait until ``path`` exists (the launcher's "all submitted"), then return x*x: every node
    stays in flight until the last one is submitted."""
    import os
    import time

    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.2)
    return x * x
