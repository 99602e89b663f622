"""What this host offers cprfast, found by trying each kernel feature for real.

Every probe yields ``{"available": bool, "detail": str, "errno": int | None, ...extras}``
so a user (or a test) can see not just *whether* a feature works but *why not*.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cprfast import __version__, _core

Probe = dict[str, Any]

HUGEPAGES = Path("/sys/kernel/mm/hugepages")
THP_SHMEM = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")

# Display labels, in report order. Probes from other parts of the extension
# add their own keys after these.
LABELS: dict[str, str] = {
    "kernel": "kernel",
    "memfd": "memfd (sealed)",
    "hugetlb_2m": "hugetlb memfd 2 MiB",
    "hugetlb_1g": "hugetlb memfd 1 GiB",
    "thp_shmem": "transparent huge pages (shmem)",
    "scm_rights": "SCM_RIGHTS fd passing",
    "soft_dirty": "soft-dirty tracking",
    "write_tracking": "userfaultfd WP_ASYNC + PAGEMAP_SCAN",
    "kvm": "/dev/kvm dirty log / dirty ring",
}


def _result(available: bool, detail: str, err: int | None = None, **extras: Any) -> Probe:
    return {"available": available, "detail": detail, "errno": err, **extras}


def probe_kernel() -> Probe:
    """The running kernel's release (every other probe depends on it)."""
    u = os.uname()
    return _result(True, f"{u.sysname} {u.release} {u.machine}", release=u.release, machine=u.machine)


def probe_hugetlb(core: Probe, page_kib: int) -> Probe:
    """A hugetlb memfd needs the page size supported *and* free pages reserved."""
    pool = HUGEPAGES / f"hugepages-{page_kib}kB"
    try:
        free = int((pool / "free_hugepages").read_text())
        total = int((pool / "nr_hugepages").read_text())
    except OSError as e:
        if not core["available"]:
            return {**core, "free_pages": 0, "total_pages": 0}
        return _result(False, f"{core['detail']}, but {pool} is missing", e.errno, free_pages=0, total_pages=0)
    extras = {"free_pages": free, "total_pages": total}
    if not core["available"]:
        return {**core, **extras}
    if free == 0:
        hint = f"reserve some: echo N > {pool / 'nr_hugepages'}"
        return _result(False, f"{core['detail']}, but 0 of {total} huge pages are free ({hint})", **extras)
    return _result(True, f"{core['detail']}; {free} of {total} huge pages free", **extras)


def probe_thp_shmem() -> Probe:
    """Whether shmem (and so memfd) mappings may use transparent huge pages."""
    try:
        text = THP_SHMEM.read_text()
    except OSError as e:
        return _result(False, f"cannot read {THP_SHMEM}", e.errno, mode=None)
    words = text.split()
    mode = next((w.strip("[]") for w in words if w.startswith("[")), text.strip())
    available = mode in ("always", "within_size", "advise", "force")
    detail = f"shmem_enabled is [{mode}]"
    if mode == "advise":
        detail += "; regions must madvise(MADV_HUGEPAGE)"
    return _result(available, detail, mode=mode)


def probe_scm_rights() -> Probe:
    """Pass SCM_MAX_FD fds in one message for real, and check the kernel refuses one more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    extras: dict[str, Any] = {"max_fds_per_message": _core.SCM_MAX_FD, "rlimit_nofile": [soft, hard]}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:  # closing the pair also drops any fds still in flight
        try:
            _core.sendmsg_fds(a.fileno(), b"x", [a.fileno()] * _core.SCM_MAX_FD, timeout=5)
            _, fds = _core.recvmsg_fds(b.fileno(), 1, timeout=5)
        except OSError as e:
            return _result(False, f"passing {_core.SCM_MAX_FD} fds in one message failed", e.errno, **extras)
        for fd in fds:
            os.close(fd)
        if len(fds) != _core.SCM_MAX_FD:
            return _result(False, f"sent {_core.SCM_MAX_FD} fds, received {len(fds)}", **extras)
        one_more = array.array("i", [a.fileno()] * (_core.SCM_MAX_FD + 1))
        try:
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, one_more)])
        except OSError as e:
            if e.errno != errno.EINVAL:
                return _result(False, "sendmsg with one fd over the limit failed oddly", e.errno, **extras)
            limit = f"{_core.SCM_MAX_FD} fds per message (the kernel refuses more)"
            return _result(True, f"{limit}; RLIMIT_NOFILE soft {soft}, hard {hard}", **extras)
    return _result(True, f"the kernel accepts more than {_core.SCM_MAX_FD} fds per message", **extras)


def collect() -> dict[str, Probe]:
    """Run every probe; keys are stable identifiers, in report order."""
    core = _core.probe_features()
    results: dict[str, Probe] = {
        "kernel": probe_kernel(),
        "memfd": core["memfd"],
        "hugetlb_2m": probe_hugetlb(core["hugetlb_2m"], 2048),
        "hugetlb_1g": probe_hugetlb(core["hugetlb_1g"], 1048576),
        "thp_shmem": probe_thp_shmem(),
        "scm_rights": probe_scm_rights(),
        "soft_dirty": core["soft_dirty"],
    }
    results["write_tracking"] = dict(_core.probe_write_tracking())
    results["kvm"] = dict(_core.probe_kvm())
    return results


def reason(probe: Probe) -> str:
    """The detail, with the errno's name and text when a call failed."""
    err = probe.get("errno")
    if err is None:
        return str(probe["detail"])
    return f"{probe['detail']}: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def render(results: Mapping[str, Probe]) -> str:
    """An aligned table: feature, yes/no, and why."""
    rows = [(LABELS.get(key, key.replace("_", " ")), "yes" if p["available"] else "no", reason(p))
            for key, p in results.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"cprfast {__version__}", f"{'feature':<{width}}  ok   detail"]
    lines += [f"{name:<{width}}  {ok:<3}  {why}" for name, ok, why in rows]
    return "\n".join(lines) + "\n"
