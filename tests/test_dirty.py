"""Dirty tracking on the real kernel: the atomic bitmap, userfaultfd write
tracking + PAGEMAP_SCAN, and the KVM dirty log of a real guest."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import re
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import cprfast
from cprfast import _core

PS = os.sysconf("SC_PAGE_SIZE")
PROBE = _core.probe_write_tracking()
needs_wp = pytest.mark.skipif(not PROBE["available"], reason=f"kernel write tracking: {PROBE['detail']}")


@pytest.fixture
def region() -> Iterator[_core.Region]:
    r = _core.Region.create("dirty-test", 1024 * PS)
    yield r
    r.close()


def poke(region: _core.Region, page: int, offset: int = 0, data: bytes = b"\x5a") -> None:
    """Write through the mapping's page tables (pwrite on the memfd would not fault)."""
    ctypes.memmove(region.address + page * PS + offset, data, len(data))


def pages_of(ds: _core.DirtySet) -> set[int]:
    return {p for first, n in ds.ranges() for p in range(first, first + n)}


def bits_of(ds: _core.DirtySet) -> set[int]:
    """Pages from the NumPy words alone (checks the word layout)."""
    bits = np.unpackbits(ds.words.view(np.uint8), bitorder="little")[: ds.npages]
    return set(np.flatnonzero(bits).tolist())


# --- the atomic bitmap -------------------------------------------------------


def test_bitmap_mark_test_count_sync_clear() -> None:
    b = _core.DirtyBitmap(200)
    assert b.npages == 200 and b.count() == 0
    b.mark(0)
    b.mark_range(62, 5)  # crosses a word boundary
    b.mark_bytes(150 * PS - 1, 2)  # one byte each of pages 149 and 150
    b.mark(199)
    assert b.test(64) and not b.test(67)
    assert b.count() == 9
    ds = b.sync()
    assert ds.ranges() == [(0, 1), (62, 5), (149, 2), (199, 1)]
    assert len(ds) == ds.count == 9 and ds.npages == 200 and ds.page_size == PS
    assert bits_of(ds) == pages_of(ds)
    assert b.count() == 0 and b.sync().count == 0  # sync cleared it
    b.mark_range(0, 200)
    b.clear()
    assert b.count() == 0
    b.mark_bytes(5 * PS, 0)  # empty range: nothing marked
    assert b.count() == 0


def test_bitmap_rejects_out_of_range() -> None:
    b = _core.DirtyBitmap(100)
    for bad in (lambda: b.mark(100), lambda: b.mark_range(90, 11), lambda: b.test(100), lambda: b.mark_bytes(100 * PS, 1)):
        with pytest.raises(ValueError, match="outside the bitmap of 100 pages"):
            bad()
    with pytest.raises(ValueError, match="at least one page"):
        _core.DirtyBitmap(0)
    with pytest.raises(OverflowError):
        b.mark(-1)
    assert b.count() == 0


def test_dirtyset_words_are_a_readonly_uint64_array() -> None:
    b = _core.DirtyBitmap(130)
    b.mark_range(64, 66)
    ds = b.sync()
    w = ds.words
    assert w.dtype == np.uint64 and w.shape == (3,)
    assert w.tolist() == [0, 2**64 - 1, 3]
    assert not w.flags.writeable and w.flags.c_contiguous
    with pytest.raises(ValueError):
        w[0] = 1
    assert ds.words.ctypes.data == w.ctypes.data  # the same buffer every time: no copy


def test_bitmap_concurrent_marks_are_each_reported_exactly_once() -> None:
    npages, nthreads = 1 << 16, 4
    b = _core.DirtyBitmap(npages)
    done = threading.Event()
    seen: list[set[int]] = []

    def writer(t: int) -> None:
        for p in range(t, npages, nthreads):
            if p % 3:
                b.mark(p)
            else:
                b.mark_range(p, 1)

    def syncer() -> None:
        while not done.is_set():
            seen.append(pages_of(b.sync()))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    s = threading.Thread(target=syncer)
    s.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    s.join()
    seen.append(pages_of(b.sync()))
    assert sum(len(x) for x in seen) == npages  # no page twice ...
    assert set().union(*seen) == set(range(npages))  # ... and none lost


# --- kernel write tracking -----------------------------------------------------


def test_probe_write_tracking_reports_each_piece() -> None:
    assert set(PROBE) == {"available", "detail", "errno", "userfaultfd", "wp_async", "pagemap_scan"}
    assert isinstance(PROBE["detail"], str) and PROBE["detail"]
    if PROBE["available"]:
        assert PROBE["userfaultfd"] and PROBE["wp_async"] and PROBE["pagemap_scan"]
        assert PROBE["errno"] is None
    else:
        assert isinstance(PROBE["errno"], int)


@needs_wp
def test_python_writes_are_reported_exactly_and_once(region: _core.Region) -> None:
    rng = random.Random(3)
    poke(region, 7)  # populated before tracking starts: not dirty
    t = _core.Tracker(region, kernel=True)
    t.start()
    assert t.active
    ctypes.string_at(region.address + 8 * PS, 64 * PS)  # reads do not dirty
    written = set(rng.sample(range(1024), 150))
    for p in written:
        poke(region, p, rng.randrange(PS - 8), os.urandom(8))
    ds = t.sync()
    assert pages_of(ds) == written == bits_of(ds)
    assert ds.count == t.last_count == len(written) and t.syncs == 1
    assert t.sync().count == 0  # get-and-clear: reported once
    poke(region, 1023, PS - 1)
    poke(region, 0)
    assert t.sync().ranges() == [(0, 1), (1023, 1)]
    assert t.syncs == 3 and t.last_count == 2
    t.stop()
    assert not t.active


@needs_wp
def test_native_thread_writes_are_all_reported(region: _core.Region) -> None:
    # ctypes.memset runs in C with the GIL released: these are native writes
    # racing with syncs, one single-byte write per page. None may be missed and
    # nothing unwritten may appear. The kernel records a write at its fault,
    # just before the store lands, so a write racing a sync can show up in
    # that sync and again in later ones while the store retries (conservative;
    # see uffd_wp.rs; seen up to three times under load) — but a sync after
    # the writers finish is empty. Exactly-once without racing syncs is
    # asserted by test_python_writes_are_reported_exactly_and_once.
    nthreads = 4
    order = list(range(1024))
    random.Random(5).shuffle(order)
    mine = [order[t::nthreads][:200] for t in range(nthreads)]
    done = threading.Event()
    seen: list[set[int]] = []
    with _core.Tracker(region, kernel=True) as t:

        def writer(pages: list[int]) -> None:
            for p in pages:
                ctypes.memset(region.address + p * PS + p % PS, 0xEE, 1)

        def syncer() -> None:
            while not done.is_set():
                seen.append(pages_of(t.sync()))

        threads = [threading.Thread(target=writer, args=(m,)) for m in mine]
        s = threading.Thread(target=syncer)
        s.start()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        done.set()
        s.join()
        seen.append(pages_of(t.sync()))
        assert t.sync().count == 0
        assert t.syncs == len(seen) + 1 > 2
    expected = {p for m in mine for p in m}
    assert set().union(*seen) == expected


@needs_wp
def test_many_scattered_runs_need_several_scan_batches() -> None:
    # Every other page written: 12,000 separate runs, more than one
    # PAGEMAP_SCAN result vector holds, so the scan must resume at walk_end.
    r = _core.Region.create("dirty-scatter", 24_000 * PS)
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * r.size).from_address(r.address))
        with _core.Tracker(r, kernel=True) as t:
            view[:: 2 * PS] = 1
            ds = t.sync()
            assert ds.count == 12_000
            assert ds.ranges() == [(p, 1) for p in range(0, 24_000, 2)]
            view[PS : 10 * PS] = 2  # a 9-page run is one range
            assert t.sync().ranges() == [(1, 9)]
        del view
    finally:
        r.close()


def _vma_flags_and_wp_bits(region: _core.Region) -> tuple[str, list[bool]]:
    """VmFlags of the region's VMA (``uw`` = uffd write-protect tracking) and
    the pagemap uffd-wp bit (57) of each of its pages."""
    start = region.address
    with open("/proc/self/smaps") as f:
        text = f.read()
    m = re.search(rf"^{start:x}-[0-9a-f]+ .*?^VmFlags: ([^\n]*)", text, re.M | re.S)
    assert m, "region VMA not found in smaps"
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // PS * 8)
        entries = struct.unpack(f"{region.size // PS}Q", f.read(region.size // PS * 8))
    return m.group(1), [bool(e >> 57 & 1) for e in entries]


@needs_wp
def test_stop_restores_the_mapping_to_untracked(region: _core.Region) -> None:
    ctypes.memset(region.address, 1, region.size)  # populate every page
    t = _core.Tracker(region, kernel=True)
    t.start()
    flags, wp = _vma_flags_and_wp_bits(region)
    assert "uw" in flags.split() and all(wp)
    poke(region, 3)
    assert t.sync().ranges() == [(3, 1)]
    t.stop()
    t.stop()  # idempotent
    flags, wp = _vma_flags_and_wp_bits(region)
    assert "uw" not in flags.split() and not any(wp)
    with pytest.raises(ValueError, match="not started"):
        t.sync()
    poke(region, 4)  # while stopped: not tracked
    t.start()  # restart works
    poke(region, 5)
    assert t.sync().ranges() == [(5, 1)]
    t.stop()


@needs_wp
def test_merges_kernel_writes_and_bitmap_marks(region: _core.Region) -> None:
    b = _core.DirtyBitmap(1024)
    b.mark(900)  # before start: discarded by start
    with _core.Tracker(region, kernel=True, bitmap=b) as t:
        poke(region, 10)
        b.mark_range(20, 3)
        b.mark(10)
        ds = t.sync()
        assert ds.ranges() == [(10, 1), (20, 3)] and ds.count == 4
        assert b.count() == 0


@needs_wp
def test_two_kernel_trackers_on_one_region_conflict(region: _core.Region) -> None:
    with _core.Tracker(region, kernel=True):
        second = _core.Tracker(region, kernel=True)
        with pytest.raises(OSError, match="already write-tracked") as e:
            second.start()
        assert e.value.errno == errno.EBUSY and not second.active


def test_tracker_rejects_bad_arguments(region: _core.Region) -> None:
    with pytest.raises(ValueError, match="at least one source"):
        _core.Tracker(region)
    with pytest.raises(ValueError, match="1023 pages but the region has 1024"):
        _core.Tracker(region, bitmap=_core.DirtyBitmap(1023))
    t = _core.Tracker(region, bitmap=_core.DirtyBitmap(1024))
    with pytest.raises(ValueError, match="not started"):
        t.sync()
    t.start()
    with pytest.raises(ValueError, match="already started"):
        t.start()
    t.stop()
    r, w = os.pipe()
    try:
        with pytest.raises(cprfast.BadFdError, match="not a KVM VM fd"):
            _core.Tracker(region, kvm=(r, 0))
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as e:
        _core.Tracker(region, kvm=(r, 0))  # closed fd
    assert e.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="invalid KVM VM fd"):
        _core.Tracker(region, kvm=(-1, 0))
    closed = _core.Region.create("closed", PS)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        _core.Tracker(closed, kernel=True)


# --- the KVM dirty log of a real guest ------------------------------------------

KVMIO = 0xAE


def _io(nr: int) -> int:
    return KVMIO << 8 | nr


def _iow(nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | KVMIO << 8 | nr


def _ior(nr: int, size: int) -> int:
    return 2 << 30 | size << 16 | KVMIO << 8 | nr


KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU, KVM_SET_TSS_ADDR, KVM_RUN = (
    _io(0x01),
    _io(0x04),
    _io(0x41),
    _io(0x47),
    _io(0x80),
)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_GET_REGS, KVM_SET_REGS = _ior(0x81, 144), _iow(0x82, 144)
KVM_GET_SREGS, KVM_SET_SREGS = _ior(0x83, 312), _iow(0x84, 312)
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_EXIT_HLT = 5


class RealModeGuest:
    """A one-vCPU KVM VM whose slot 0 maps a region at guest address 0 and
    runs real-mode code: for each page, `mov ds, page*0x100; mov byte [bx], v`."""

    def __init__(self, region: _core.Region, *, slot_size: int | None = None, log: bool = True) -> None:
        self.region = region
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        fcntl.ioctl(self.vm, KVM_SET_TSS_ADDR, 0x7FFF_D000)
        mem = struct.pack("IIQQQ", 0, KVM_MEM_LOG_DIRTY_PAGES if log else 0, 0, slot_size or region.size, region.address)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, mem)
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self.run_area = mmap.mmap(self.vcpu, fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0))

    def write_pages(self, pages: list[int], value: int = 0xA5) -> None:
        """Load code at guest address 0 (page 0, never written) and run it to HLT."""
        code = b""
        for p in pages:
            assert 0 < p < 256  # real mode reaches the first MiB
            off = (p * 37) % (PS - 1)
            code += b"\xb8" + struct.pack("<H", p * (PS // 16))  # mov ax, segment of page p
            code += b"\x8e\xd8"  # mov ds, ax
            code += b"\xbb" + struct.pack("<H", off)  # mov bx, off
            code += b"\xc6\x07" + bytes([value])  # mov byte [bx], value
        code += b"\xf4"  # hlt
        assert len(code) < PS
        ctypes.memmove(self.region.address, code, len(code))
        sregs = bytearray(312)
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("QIH", sregs, 0, 0, 0xFFFF, 0)  # cs: base 0, selector 0
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        fcntl.ioctl(self.vcpu, KVM_GET_REGS, regs)
        struct.pack_into("QQ", regs, 128, 0, 2)  # rip = 0, rflags = 2
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, bytes(regs))
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("I", self.run_area, 8)
        assert reason == KVM_EXIT_HLT, f"guest exit reason {reason}"
        for p in pages:  # the guest really wrote guest RAM = our region
            assert ctypes.string_at(self.region.address + p * PS + (p * 37) % (PS - 1), 1) == bytes([value])

    def close(self) -> None:
        self.run_area.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return f"/dev/kvm: {e}"
    return None


needs_kvm = pytest.mark.skipif(_kvm_usable() is not None, reason=str(_kvm_usable()))


@pytest.fixture
def guest_ram() -> Iterator[_core.Region]:
    r = _core.Region.create("kvm-guest-ram", 256 * PS)
    yield r
    r.close()


@needs_kvm
def test_kvm_dirty_log_reports_exactly_the_guest_writes(guest_ram: _core.Region) -> None:
    g = RealModeGuest(guest_ram)
    try:
        with _core.Tracker(guest_ram, kvm=(g.vm, 0)) as t:
            first = [3, 5, 6, 64, 200, 255]
            g.write_pages(first)
            ds = t.sync()
            assert ds.ranges() == [(3, 1), (5, 2), (64, 1), (200, 1), (255, 1)]
            assert t.sync().count == 0  # cleared (and re-protected) by the sync
            g.write_pages([5, 17])  # page 5 again: reported again after the clear
            assert pages_of(t.sync()) == {5, 17}
            poke(guest_ram, 100)  # a host write is not in the KVM log
            assert t.sync().count == 0
    finally:
        g.close()


@needs_kvm
@needs_wp
def test_kvm_log_kernel_tracking_and_bitmap_merge(guest_ram: _core.Region) -> None:
    g = RealModeGuest(guest_ram)
    b = _core.DirtyBitmap(256)
    try:
        with _core.Tracker(guest_ram, kvm=(g.vm, 0), kernel=True, bitmap=b) as t:
            g.write_pages([9, 10])
            poke(guest_ram, 100)
            b.mark(150)
            # Page 0 too: the host wrote the guest's code there (kernel tracking
            # sees host writes, the KVM log sees guest writes).
            assert pages_of(t.sync()) == {0, 9, 10, 100, 150}
            assert t.sync().count == 0
    finally:
        g.close()


@needs_kvm
def test_kvm_slot_must_map_the_region_and_log_dirty_pages(guest_ram: _core.Region) -> None:
    g: Any = RealModeGuest(guest_ram, slot_size=128 * PS)
    try:
        with pytest.raises(ValueError, match="does not map exactly this region"):
            _core.Tracker(guest_ram, kvm=(g.vm, 0))
        with pytest.raises(OSError, match="KVM_MEM_LOG_DIRTY_PAGES") as e:
            _core.Tracker(guest_ram, kvm=(g.vm, 1))  # no such slot
        assert e.value.errno == errno.ENOENT
    finally:
        g.close()
    g = RealModeGuest(guest_ram, log=False)
    try:
        with pytest.raises(OSError, match="KVM_MEM_LOG_DIRTY_PAGES"):
            _core.Tracker(guest_ram, kvm=(g.vm, 0))
    finally:
        g.close()
