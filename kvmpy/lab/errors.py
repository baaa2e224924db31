"""The lab's one error: it could not be built or started, or the command never ran."""

from kvmpy.errors import KvmpyError


class LabError(KvmpyError):
    """The lab cannot be built or booted; the message says why in one line."""

    exit_status = 125  # like `env`/`timeout`: the command itself never ran
