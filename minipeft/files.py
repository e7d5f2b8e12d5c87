"""Writing files so that a crash never leaves half of one: temp file beside it, fsync, rename."""

import os
import tempfile
from pathlib import Path

UMASK = os.umask(0o022)  # read once, at import (os.umask can only read it by setting it), and put back
os.umask(UMASK)


def write_atomically(path, data: bytes):
    """Write to a temporary file beside `path`, fsync it, then rename over `path`. The file gets the mode any
    new file gets (0666 less the umask), not the temporary file's private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
