"""Loopback ports for servers whose port a test must know before they start
(a config to write, a balancer to point at them). Never a fixed port; the
port is free a moment ago, which is as good as loopback allows."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_run(n: int, besides: int) -> int:
    """A port P such that P+1 .. P+n are free now: instance N listens on P+N."""
    while True:
        base = free_port()
        wanted = range(base + 1, base + n + 1)
        if wanted.stop > 65536 or besides in wanted:
            continue
        try:
            for port in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
