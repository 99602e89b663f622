"""cpr-transfer state hand-over: fds batched per sendmsg vs one fd per message (QEMU's writer).

Baseline: ``fds_per_message=1``, what QEMU's ``qemu_file_put_fd`` does. 16 is our
default (the most QEMU's reader takes per recvmsg); 253 is the kernel's limit,
usable when the target is cprfast. Compare the means in the same run.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from cprfast import cpr_state as cs

N_FDS = 1000


@pytest.fixture(scope="module")
def state() -> Iterator[cs.CprState]:
    st = cs.CprState()
    for i in range(N_FDS):
        fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        st.save_fd("pc.ram" if i == 0 else "vfio0_interrupt", i, fd)
        os.close(fd)
    yield st
    st.close()


def _hand_over(state: cs.CprState, per_message: int) -> None:
    a, b = socket.socketpair()
    sender = threading.Thread(target=cs.send_state, args=(state, a), kwargs={"fds_per_message": per_message})
    sender.start()
    received = cs.receive_state(b, timeout=60)
    sender.join()
    assert len(received) == N_FDS
    received.close()
    a.close()
    b.close()


@pytest.mark.benchmark(group=f"cpr-transfer state, {N_FDS} fds")
@pytest.mark.parametrize("per_message", [1, 16, 253], ids=["qemu-1-per-msg", "batch-16", "batch-253"])
def test_send_receive_state(benchmark: BenchmarkFixture, state: cs.CprState, per_message: int) -> None:
    benchmark.pedantic(_hand_over, args=(state, per_message), rounds=15, warmup_rounds=2)
