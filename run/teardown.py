"""How a process of this tool ends: without the interpreter's last garbage collections."""

from __future__ import annotations

import atexit
import gc


def skip_final_collections() -> None:
    """At exit, leave every object to the operating system instead of the cyclic collector: with torch and
    transformers imported, the interpreter's collections at shutdown walk millions of objects (0.5 to 1.5 s of
    CPU per process, and a launch ends two of ours). Nothing here waits on a cycle being freed: files,
    trackers and process groups are closed explicitly, and objects freed by reference count still are."""
    atexit.register(gc.freeze)  # registered first, so it runs after the handlers that libraries register later
