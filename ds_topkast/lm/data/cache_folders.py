"""Cache folders written once, safely when several ranks, nodes or jobs write the same one at once."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(folder: Path, done: str, fill: Callable[[Path], None]) -> Path:
    """`folder`, made by `fill` unless it already holds `done`.

    `fill` writes into a private folder beside it (named after this host and process, so
    nodes sharing a cache never touch each other's), which is then renamed into place; a
    writer that finishes second finds the folder there and discards its own copy.
    """
    if (folder / done).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=folder.parent,
                                    prefix=f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}-"))
    try:
        fill(private)
        os.rename(private, folder)
    except OSError:
        if not (folder / done).is_file():  # not another writer's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return folder
