"""9P2000.L: a file server for one host directory, with no transport.

- `kvmpy.ninep.wire`: message numbers, the bounds-checked message reader, reply packing.
- `kvmpy.ninep.hostdir`: the host directory as O_PATH file descriptors, every name
  resolved beneath its parent (openat2 RESOLVE_BENEATH, or one O_NOFOLLOW component).
- `kvmpy.ninep.server`: `NinePServer`, the protocol: a request's bytes in, a reply out.

The virtio transport is `kvmpy.virtio.ninep`; docs/9p.md states the security model.
Nothing here imports KVM or virtio: the server runs under unit tests and fuzzers as it is.
"""
