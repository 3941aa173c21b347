"""Errors a user can act on."""


class SpineautoError(Exception):
    """An error a user can act on: the CLI prints its message as one line and exits non-zero."""


def os_error_line(e: OSError, what: str = "") -> str:
    """One line naming the path of an OS error and its cause ("no space left" for a full disk)."""
    import errno

    where = e.filename2 or e.filename or "(unknown path)"  # os.replace(temporary, target): the target
    reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e) or type(e).__name__)
    return f"{where}: {what + ': ' if what else ''}{reason}"
