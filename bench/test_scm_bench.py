"""fd passing: 10,000 fds in batched bundles (send_fds) vs one fd per message
with a 1-byte payload (QEMU's cpr-transfer way), both measured in this run
over a socketpair with a receiver thread. Reported as a ratio."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from cprfast import _core

N_FDS = 10_000
ROUNDS = 5


@pytest.fixture
def pair() -> Iterator[tuple[int, int]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a.fileno(), b.fileno()


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    """N_FDS fds to pass: 1,000 distinct memfds, each ten times (the receiver
    then holds 10,000 new fds, within the 20,000 RLIMIT_NOFILE)."""
    fds = [os.memfd_create(f"bench{i}") for i in range(N_FDS // 10)]
    yield fds * 10
    for fd in fds:
        os.close(fd)


received: list[int] = []


def close_received() -> None:
    """Close what the last round received; runs outside the timed region."""
    for fd in received:
        os.close(fd)
    received.clear()


def with_receiver(receive: Callable[[], list[int]], send: Callable[[], None]) -> None:
    thread = threading.Thread(target=lambda: received.extend(receive()))
    thread.start()
    send()
    thread.join()
    assert len(received) == N_FDS


def batched(sock: tuple[int, int], fds: list[int]) -> None:
    a, b = sock
    with_receiver(lambda: _core.recv_fds(b, timeout=60)[1], lambda: _core.send_fds(a, b"", fds, timeout=60))


def one_per_message(sock: tuple[int, int], fds: list[int]) -> None:
    a, b = sock

    def receive() -> list[int]:
        got: list[int] = []
        for _ in range(N_FDS):
            got += _core.recvmsg_fds(b, 1, 1, timeout=60)[1]
        return got

    def send() -> None:
        for fd in fds:
            _core.sendmsg_fds(a, b" ", [fd], timeout=60)

    with_receiver(receive, send)


def test_fd_passing_batched_vs_one_per_message(
    benchmark: BenchmarkFixture, pair: tuple[int, int], memfds: list[int]
) -> None:
    baseline = []
    for _ in range(ROUNDS):
        close_received()
        start = time.perf_counter()
        one_per_message(pair, memfds)
        baseline.append(time.perf_counter() - start)
    benchmark.pedantic(batched, args=(pair, memfds), setup=close_received, rounds=ROUNDS, iterations=1)
    close_received()
    per_message = statistics.median(baseline)
    assert benchmark.stats is not None
    bundle = benchmark.stats.stats.median
    benchmark.extra_info.update(
        n_fds=N_FDS,
        one_per_message_median_s=per_message,
        batched_median_s=bundle,
        speedup=per_message / bundle,
    )
    print(  # the figure this benchmark exists to report
        f"\n{N_FDS} fds: one per message {per_message * 1e3:.1f} ms, "
        f"batched {bundle * 1e3:.1f} ms, ratio {per_message / bundle:.1f}x"
    )
