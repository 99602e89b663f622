"""The reference VMM: a KVM (or native-threads) guest live-updated with cprfast.

:class:`~cprfast.vmm.machine.Machine` is the embeddable part; ``cprfast-vmm`` /
``python -m cprfast.vmm`` is the QEMU-like command line around it. The names
below load on first use: ``python -m cprfast.vmm`` imports this package first,
and a cpr-exec successor must not pay for the machine before it even starts.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cprfast.vmm.machine import RAM_NAME, Machine

__all__ = ["RAM_NAME", "Machine"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from cprfast.vmm import machine

        return getattr(machine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
