"""Start a real Label Studio server for the tests (like a database: its own venv, its own data dir).

The binary comes from ``DATAENGINE_LABEL_STUDIO`` or ``<repo>/.venv-labelstudio/bin/label-studio``. The server runs
on a free 127.0.0.1 port with a temporary ``LABEL_STUDIO_BASE_DATA_DIR``, a known admin and a random 40-hex legacy
token, and serves local files below ``document_root``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LabelStudioServer", "label_studio_binary", "free_port", "start_server", "INSTALL_HINT"]

INSTALL_HINT = ("install the server in its own venv: python -m venv .venv-labelstudio && "
                ".venv-labelstudio/bin/pip install label-studio (or point DATAENGINE_LABEL_STUDIO at a label-studio "
                "binary)")


@dataclass
class LabelStudioServer:
    url: str
    token: str
    email: str
    document_root: Path
    data_dir: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)


def label_studio_binary() -> Path | None:
    """The label-studio executable to run, or ``None`` when it is not installed."""
    env = os.environ.get("DATAENGINE_LABEL_STUDIO")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".venv-labelstudio" / "bin" / "label-studio"
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(binary: Path, workdir: Path, document_root: Path, timeout: float = 240.0) -> LabelStudioServer:
    """Start the server and wait for ``GET /health``; on failure stop it and raise with the log tail."""
    port = free_port()
    data_dir = workdir / "ls-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(20)
    email = "annotator@example.com"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": email,
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LATEST_VERSION_CHECK": "false",  # no call to pypi.org at start (offline CI)
        "COLLECT_ANALYTICS": "false",
    }
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        env.pop(key, None)
    log = workdir / "label-studio.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(binary), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LabelStudioServer(f"http://127.0.0.1:{port}", token, email, document_root, data_dir, log, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {process.returncode}; log tail:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"label-studio did not answer /health within {timeout:.0f} s; log tail:\n{server.log_tail()}")
