"""A VM's state outside the VM: values, the saved-state format, snapshots on disk.

`values` is the vocabulary of every owner's `state()` / `restore(state)` pair;
`stream` the versioned, sectioned format those values travel in (a file or a socket);
`ram` and `disks` guest RAM and disk images, which are kept apart from the small
state; `snapshot` a directory holding all of them. See docs/snapshots.md.
"""
