"""The reference VMM: a KVM (or native-threads) guest live-updated with cprfast.

:class:`~cprfast.vmm.machine.Machine` is the embeddable part; ``cprfast-vmm`` /
``python -m cprfast.vmm`` is the QEMU-like command line around it.
"""

from cprfast.vmm.machine import RAM_NAME, Machine

__all__ = ["RAM_NAME", "Machine"]
