"""A zoo mirror for tests: a folder laid out as ``$MEDSSL_ZOO_URL/<name>/model.safetensors``, served by
``http.server`` on a loopback port, counting the requests it answers."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path


def mirror_folder(root: Path, weights: dict[str, Path]) -> Path:
    """``root/<name>/model.safetensors`` for each ``name -> weights file``."""
    for name, src in weights.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / name / "model.safetensors")
    return root


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``folder`` on 127.0.0.1 (a free port): yields ``(base URL, request paths answered)``; the server
    is shut down on exit."""
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
