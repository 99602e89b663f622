"""The cpr-exec keeper: a real CLONE_VM process sharing our address space, named in the environment."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cprfast import exec_keeper
from cprfast.modes.exec import ExecDriver


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_keep_take_release_round_trip() -> None:
    environ: dict[str, str] = {}
    r, w = os.pipe()
    try:
        keeper = exec_keeper.keep([w], environ)
        pid = exec_keeper.take(environ)
        assert pid == keeper.pid and environ == {}
        # It shares our address space (same mappings) and is our child until released.
        assert os.readlink(f"/proc/{pid}/exe") == os.readlink("/proc/self/exe")
        assert str(pid) in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        exec_keeper.release(pid).join(timeout=30)
        assert not alive(pid)
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # the keeper's copy of the write end died with it
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_cancel_ends_the_keeper_and_forgets_it() -> None:
    environ: dict[str, str] = {}
    keeper = exec_keeper.keep([], environ)
    exec_keeper.cancel(keeper, environ)
    assert environ == {} and not alive(keeper.pid)
    keeper.cancel()  # idempotent


def test_take_ignores_garbage_and_release_refuses_strangers(caplog: pytest.LogCaptureFixture) -> None:
    assert exec_keeper.take({exec_keeper.KEEPER_ENV: "12x"}) is None
    assert exec_keeper.take({}) is None
    with caplog.at_level(logging.WARNING, logger="cprfast.exec_keeper"):
        exec_keeper.release(1).join(timeout=30)  # init is not our child: refused, logged, nothing killed
    assert "cannot release the cpr-exec keeper 1" in caplog.text


def test_driver_goes_on_without_a_keeper_it_cannot_start(caplog: pytest.LogCaptureFixture) -> None:
    class Host:
        def exec_keep_fds(self) -> list[int]:
            return list(range(3, 3 + 65))  # more than a keeper holds

    driver = ExecDriver(Host(), None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="cprfast.modes.exec"):
        assert driver._keeper() is None
    assert "no keeper for the old address space" in caplog.text
    assert ExecDriver(object(), None)._keeper() is None  # type: ignore[arg-type]  # a host without exec_keep_fds
