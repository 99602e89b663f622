"""`cprfast info` probes the real kernel; its answers must agree with the system."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cprfast import _core, info

OWN_KEYS = {"kernel", "memfd", "hugetlb_2m", "hugetlb_1g", "thp_shmem", "scm_rights", "soft_dirty"}


@pytest.fixture(scope="module")
def report() -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "cprfast", "info", "--json"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    doc = json.loads(out)
    assert doc["version"] == _core.core_version()
    probes: dict[str, dict[str, Any]] = doc["probes"]
    return probes


def test_json_has_every_key_with_the_probe_shape(report: dict[str, dict[str, Any]]) -> None:
    assert report.keys() >= OWN_KEYS
    for name, fn in (("write_tracking", "probe_write_tracking"), ("kvm", "probe_kvm")):
        assert name in report or hasattr(_core, fn)
    for name, p in report.items():
        assert isinstance(p["available"], bool), name
        assert isinstance(p["detail"], str) and p["detail"], name
        assert p["errno"] is None or isinstance(p["errno"], int), name
        assert not (p["available"] and p["errno"] is not None), name


def test_answers_agree_with_the_system(report: dict[str, dict[str, Any]]) -> None:
    assert report["kernel"]["release"] == os.uname().release
    assert report["memfd"]["available"] is True
    scm = report["scm_rights"]
    assert scm["available"] is True
    assert scm["max_fds_per_message"] == 253
    assert scm["rlimit_nofile"] == list(resource.getrlimit(resource.RLIMIT_NOFILE))
    for key, kib in (("hugetlb_2m", 2048), ("hugetlb_1g", 1048576)):
        pool = info.HUGEPAGES / f"hugepages-{kib}kB"
        if pool.exists():
            assert report[key]["free_pages"] == int((pool / "free_hugepages").read_text())
            assert report[key]["available"] == (report[key]["free_pages"] > 0)
    if info.THP_SHMEM.exists():
        assert f"[{report['thp_shmem']['mode']}]" in info.THP_SHMEM.read_text()


def test_soft_dirty_matches_kernel_config(report: dict[str, dict[str, Any]]) -> None:
    config = Path("/proc/config.gz")
    if not config.exists():
        pytest.skip("no /proc/config.gz to compare with")
    built_in = "CONFIG_MEM_SOFT_DIRTY=y" in gzip.decompress(config.read_bytes()).decode()
    assert report["soft_dirty"]["available"] == built_in


@pytest.fixture
def reserved_2m_page() -> Iterator[None]:
    """Reserve one 2 MiB huge page for the test and give it back after."""
    nr = info.HUGEPAGES / "hugepages-2048kB" / "nr_hugepages"
    if os.geteuid() != 0 or not nr.exists():
        pytest.skip("needs root and 2 MiB huge pages to reserve one")
    old = int(nr.read_text())
    nr.write_text(str(old + 1))
    try:
        if int(nr.read_text()) <= old:
            pytest.skip("the kernel could not reserve a 2 MiB huge page")
        yield
    finally:
        nr.write_text(str(old))


@pytest.mark.usefixtures("reserved_2m_page")
def test_hugetlb_probe_sees_reserved_pages_and_region_works() -> None:
    p = info.probe_hugetlb(_core.probe_features()["hugetlb_2m"], 2048)
    assert p["available"] is True and p["free_pages"] >= 1
    region = _core.Region.create("huge", 2 << 20, hugetlb=2 << 20)
    region.close()


def test_human_table_names_every_feature_and_failing_errno() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cprfast", "info"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    results = info.collect()
    for key, p in results.items():
        line = next(line for line in out.splitlines() if line.startswith(info.LABELS.get(key, key)))
        assert (" yes " if p["available"] else " no ") in line
    assert info.reason({"available": False, "detail": "memfd_create failed", "errno": 12}) == (
        "memfd_create failed: ENOMEM (Cannot allocate memory)"
    )
