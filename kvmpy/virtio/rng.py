"""virtio-rng, the entropy device (virtio 1.2 §5.4): guest buffers filled from getrandom().

What it is: one request queue; every device-writable buffer the driver offers
comes back filled with bytes from the host's `os.getrandom()` (the kernel
CSPRNG, never blocking once the host pool is initialised). Linux exposes it
as /dev/hwrng.

What it is not: a rate limiter. Each request is capped at `MAX_REQUEST`
bytes (§5.4.6.2 lets the device use less than the whole buffer) so that a
guest cannot make the device allocate its whole RAM in one request.

Learned from kvmtool's virtio/rng.c.
"""

from __future__ import annotations

import os

from kvmpy.virtio.device import VIRTIO_ID_ENTROPY, VirtioDevice
from kvmpy.virtio.iov import iov_write, span_slice
from kvmpy.virtio.queue import DescriptorChain

REQUESTQ = 0
MAX_REQUEST = 64 * 1024


class Rng(VirtioDevice):
    device_id = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, queue_size: int = 256) -> None:
        super().__init__((queue_size,))

    def process_queue(self, index: int) -> None:
        if index == REQUESTQ:
            self.drain(REQUESTQ, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        r_gpas, r_lengths, gpas, lengths = chain.spans()
        # Every buffer must be in guest RAM, as for any chain, but windows are taken only
        # on the bytes filled
        chain.require(r_gpas, r_lengths)
        chain.require(gpas, lengths)
        if r_gpas:
            # §5.4.6.1: the driver offers device-writable buffers only.
            self.warn("readable", "request with device-readable buffers; they are ignored")
        n = min(chain.writable_bytes, MAX_REQUEST)
        return iov_write(chain.views(*span_slice(gpas, lengths, 0, n)), os.getrandom(n)) \
            if n else 0
