"""A Linux tap interface as a virtio-net backend.

What it is: `/dev/net/tun` opened as a tap (IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR), created or attached by name, with a 12-byte vnet header
(TUNSETVNETHDRSZ) so that frames cross in exactly virtio 1.x's
`struct virtio_net_hdr` framing (§5.1.6) and carry checksum/GSO offload
metadata both ways. TUNSETOFFLOAD tells the kernel which offloads the guest
accepted, so it only hands over partial-checksum or GSO frames the guest
can take. The fd is non-blocking; the I/O thread watches it.

What it is not: the interface's configuration. Addresses, links and
namespaces belong to the caller (`ip link set NAME up`, ...).

<linux/if_tun.h> is the reference for every number here.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence

from kvmpy.errors import ConfigError

TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_UFO = 0x10

VNET_HDR_LEN = 12  # struct virtio_net_hdr with num_buffers (virtio 1.x)
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")


class Tap:
    """A tap fd: `read_frame`/`write_frame` move one Ethernet frame with its vnet header."""

    def __init__(self, name: str = "") -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"/dev/net/tun: {e.strerror}") from None
        try:
            features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
            if not features & IFF_VNET_HDR:
                raise ConfigError("this kernel's tap has no IFF_VNET_HDR")
            ifr = fcntl.ioctl(fd, TUNSETIFF,
                              _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"tap {name or '(new)'}: {e.strerror}") from None
        except ConfigError:
            os.close(fd)
            raise
        self.fd = fd
        self.name = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
        self.offload_capable = self._probe_offload()

    def _probe_offload(self) -> bool:
        try:
            self.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
            self.set_offload(0)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self.fd

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: what the guest can receive (TSO/UFO only together with CSUM)."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def read_frame(self, buf: bytearray | memoryview) -> int | None:
        """One frame (vnet header first) into `buf`; None when none is waiting."""
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return None

    def write_frame(self, views: Sequence[memoryview]) -> None:
        """One frame, vnet header first, gathered from `views` (one writev)."""
        os.writev(self.fd, views)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
