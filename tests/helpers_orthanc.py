"""A real PACS for the tests: Orthanc with its DICOMweb plugin on a free loopback port, from a temporary config.

CI installs Orthanc with ``scripts/setup_env.sh`` (Debian packages ``orthanc`` and ``orthanc-dicomweb``).
When the binary or the plugin is missing the tests that need it fail loudly: they are never skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(url: str, auth: tuple[str, str] | None) -> bool:
    request = urllib.request.Request(f"{url}/system")
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def orthanc(folder: Path, users: dict[str, str] | None = None, **more: Any) -> Iterator[str]:
    """Run Orthanc storing into ``folder``; yield its DICOMweb root (``http://127.0.0.1:PORT/dicom-web``).

    ``users`` turns HTTP basic authentication on with these accounts.
    """
    binary = shutil.which("Orthanc")
    if binary is None or not PLUGIN.is_file():
        pytest.fail(
            "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb; "
            "scripts/setup_env.sh does it as root); the PACS tests need a real PACS"
        )
    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medssl-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "HttpBindAddress": "127.0.0.1",  # ignored by older Orthanc; RemoteAccessAllowed false covers it
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "DicomServerEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **more,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    try:
        deadline = time.monotonic() + 60
        while not _up(root, auth):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"Orthanc did not start on port {port} (exit {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        yield f"{root}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
