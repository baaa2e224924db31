"""The split ring's layout (virtio 1.2 §2.7), named once for the queue and its shortcut.

What it is: descriptor and ring flags, entry sizes and limits, and `Spans`, the shape in
which a validated chain's buffers leave `kvmpy.virtio.queue`. What it is not: code.
"""

from __future__ import annotations

from collections.abc import Sequence

# §2.7.5 descriptor flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 / §2.7.8 ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16  # struct virtq_desc: addr u64, len u32, flags u16, next u16
USED_ELEM_SIZE = 8  # struct virtq_used_elem
QUEUE_SIZE_MAX = 32768  # §2.7: "The maximum Queue Size value is 32768"
CHAIN_BYTES_MAX = 1 << 32  # §2.7.5.2: chains shorter than 2^32 bytes in total

# A chain's buffers as columns: readable gpas, their lengths, writable gpas, their lengths.
Spans = tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]]
