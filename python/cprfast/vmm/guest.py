"""The reference VMM's guest: a real KVM vCPU or native threads, behind one surface.

Both kinds run on the same guest-RAM layout (``rust/core/src/layout.rs``): a
heartbeat at 0x1000 bumped at least every 10 µs, and a hot working set written
page after page. The VMM only needs start / pause / resume and the vCPU state
as bytes, which travels on the main channel as the ``cpu`` device; the memory
itself stays in the memfd.
"""

from __future__ import annotations

import struct

from cprfast import _core

TYPE_CHECKING = False  # no ``typing`` at run time: a cpr-exec successor builds the guest before it resumes
if TYPE_CHECKING:
    from typing import Literal

    GuestKind = Literal["kvm", "threads"]

HEARTBEAT = 0x1000
"""Guest-RAM offset of the u64 heartbeat (``layout::HEARTBEAT``)."""
HOT_START = 0x10_0000
"""First byte of the hot working set (``layout::HOT_START``)."""
STATE_VERSION = 1
RESUME_WINDOW_S = 0.05
"""How long a vCPU thread spins for an expected resume before it sleeps again."""

_U64 = struct.Struct("<Q")


def resolve_kind(kind: str) -> GuestKind:
    """``auto`` means KVM when the probe says it works, else threads; explicit kinds are checked."""
    if kind == "threads":
        return "threads"
    if kind not in ("kvm", "auto"):
        raise ValueError(f"unknown guest kind {kind!r} (kvm, threads or auto)")
    probe = _core.probe_kvm()
    if probe.get("available"):
        return "kvm"
    if kind == "auto":
        return "threads"
    from cprfast.errors import FeatureUnavailableError

    raise FeatureUnavailableError(f"--guest kvm: KVM is not usable here: {probe.get('detail')}")


class Guest:
    """One guest on one guest-RAM region; the VMM's vCPU(s).

    ``fresh`` boots a new guest (writes its code and page tables into RAM);
    otherwise the guest waits for :meth:`load_state` from the previous process,
    whose RAM it shares. All memory setup (KVM memory slot, vCPU creation) is
    done here, so it can happen before the source guest stops. ``cpus`` pins
    the vCPU (or guest) thread from its start. ``warm_up`` (with ``fresh``
    False, for a target whose source still runs the guest): build the new KVM
    VM's mappings now (:meth:`cprfast._core.KvmVm.warm_up`), so the guest's
    first instructions after the resume do not wait for them. A cpr-exec
    successor has no use for it: its guest is paused either way.
    """

    def __init__(
        self,
        kind: GuestKind,
        region: _core.Region,
        hot_len: int,
        *,
        fresh: bool,
        cpus: tuple[int, ...] | None = None,
        warm_up: bool = False,
    ) -> None:
        self.kind: GuestKind = kind
        self.region = region
        self.cpus = cpus
        self.slot_seconds = 0.0
        self.warmed = False
        """Whether the KVM guest's memory mappings were built before its state arrived."""
        self._vm: _core.KvmVm | None = None
        self._threads: _core.ThreadsGuest | None = None
        self._started = False
        if kind == "kvm":
            vm = _core.KvmVm()
            try:
                self.slot_seconds = vm.set_memory(region)
                vm.create_vcpu()
                if fresh:
                    vm.setup_guest(HOT_START, hot_len)
                else:  # the vCPU thread waits, parked, for the predecessor's state: not spawned in the pause
                    if warm_up:  # only reads RAM: safe while the source runs the guest
                        self.warmed = vm.warm_up()
                    vm.start(cpus, paused=True)
                    self._started = True
            except BaseException:
                vm.close()
                raise
            self._vm = vm
        else:
            self._threads = _core.ThreadsGuest(region, HOT_START, hot_len)

    @property
    def heartbeat(self) -> int:
        """The heartbeat as the guest left it in RAM."""
        value: int = _U64.unpack(self.region.read(HEARTBEAT, 8))[0]
        return value

    def _impl(self) -> _core.KvmVm | _core.ThreadsGuest:
        impl = self._vm if self._vm is not None else self._threads
        if impl is None:
            raise ValueError("the guest is closed")
        return impl

    def resume(self) -> None:
        """Run the guest: the first call starts the vCPU thread, later ones resume it."""
        impl = self._impl()
        if self._started:
            impl.resume()
        else:
            impl.start(self.cpus)
            self._started = True

    def expect_resume(self) -> None:
        """A resume follows shortly (a live update's target, once the source stopped its guest):
        a KVM vCPU thread then waits for it spinning on its own CPU, not asleep."""
        if self._started and self._vm is not None:
            self._vm.expect_resume(RESUME_WINDOW_S)

    def pause(self) -> None:
        """Stop the guest; when this returns it writes nothing more until :meth:`resume`."""
        if self._started:
            self._impl().pause()

    @property
    def running(self) -> bool:
        """Whether the vCPU runs now."""
        return self._started and self._impl().running

    def dirty_log(self, on: bool) -> tuple[int, int] | None:
        """Switch KVM dirty logging on slot 0; return (vm fd, slot) for the tracker, or None.

        Only a KVM guest has a dirty log: a threads guest's writes are tracked by the
        kernel (userfaultfd write-protect + PAGEMAP_SCAN) instead.
        """
        if self._vm is None:
            return None
        self._vm.set_dirty_log(0, on)
        return (self._vm.fileno(), 0) if on else None

    def kvm_fds(self) -> tuple[int, ...]:
        """The KVM VM and vCPU fds (none for a threads guest), for a cpr-exec keeper."""
        if self._vm is None:
            return ()
        return (self._vm.fileno(), self._vm.vcpu_fileno())

    def save_state(self) -> bytes:
        """The vCPU state (device ``cpu`` on the main channel); the guest must be paused."""
        return bytes(self._impl().save_state())

    def load_state(self, data: bytes, version: int) -> None:
        """Adopt the predecessor's vCPU state; the guest must not run yet. After
        :meth:`expect_resume` the vCPU thread loads it on its own CPU while the caller goes
        on: :meth:`wait_loaded` tells how that went."""
        self._impl().load_state(data)

    def wait_loaded(self) -> None:
        """Wait until the vCPU thread has loaded the state :meth:`load_state` gave it; raises
        if that failed (then the guest must not run here)."""
        if self._vm is not None:
            self._vm.wait_loaded()

    def close(self) -> None:
        """Stop the vCPU thread and release KVM; the region stays with its owner."""
        vm, self._vm = self._vm, None
        threads, self._threads = self._threads, None
        if vm is not None:
            vm.close()
        if threads is not None:
            threads.close()
