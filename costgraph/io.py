"""Output files are written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable


def write_atomic(path: str, data: str | bytes | Iterable[str]) -> None:
    """Write to a temporary file beside `path`, then rename over it.

    `data`: the text or bytes, or text in chunks (a large file streamed without one string of it all).
    An error names `path`, never the temporary file (which is removed).
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise OSError(f"output folder does not exist: {directory}")
    mode = "wb" if isinstance(data, bytes) else "w"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        with os.fdopen(fd, mode) as f:
            if isinstance(data, (str, bytes)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a result file is an ordinary file
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        # from mkstemp (tmp not made yet), the writes (no file name) or the rename (the temporary name)
        if isinstance(e, OSError) and e.errno is not None and (tmp is None or e.filename in (None, tmp)):
            # "[Errno 13] Permission denied: 'out/report.csv'", not the temporary name
            raise type(e)(e.errno, e.strerror, path) from None
        raise
