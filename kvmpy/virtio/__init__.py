"""virtio devices for kvmpy: split virtqueues, the virtio-mmio transport and four devices.

What it is: KVM-free device models (virtio 1.2) that see guest memory, a bus
offset and an interrupt line, so they run the same under a VM, a unit test or
a fuzzer. `queue` (split virtqueues), `iov` (scatter-gather views), `device`
(the VirtioDevice base), `mmio` (the transport), `blk`, `net` (+ `tap`),
`console`, `rng`, `iothread` (epoll loop, ioeventfd/irqfd wiring), and
`driver` (a guest-side driver in Python for tests and fuzzing only).

What it is not: vhost, virtio-pci, or the packed ring.

How a VM uses one device in virtio-mmio slot n:

    dev = Block("disk.img", read_only=False)        # or Net(Tap("tap0")), Console(out), Rng()
    t = VirtioMmioTransport(dev, memory, irq_line)  # irq_line: any IrqLine for slot_irq(n)
    mmio_bus.insert(slot_base(n), layout.VIRTIO_MMIO_SIZE, t, dev.name)
    cmdline.append(cmdline_fragment(slot_base(n), slot_irq(n)))
    wire_eventfds(vm, iothread, t, slot_base(n), slot_irq(n))  # ioeventfd + irqfd + backend fds
    # without eventfds: iothread.add_device(dev), so a tap is still watched

and once: `iothread = IoThread(); iothread.start()`, and at exit `iothread.close()`,
`dev.close()`.
"""
