"""A real `vitkit serve` process on a free loopback port, and a small HTTP client for it, shared by the service
tests (the API through urllib, the page through a browser)."""

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

STARTUP_S = 120  # importing torch on a busy 2-core machine can take most of a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, *args: str) -> Iterator[str]:
    """Start `vitkit serve model_dir *args` and yield its base URL once /health answers; stop it after."""
    port = free_port()
    command = [sys.executable, "-m", "vitkit", "serve", str(model_dir), "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vitkit serve exited with {proc.returncode}:\n{log_path.read_text()}")
                with contextlib.suppress(OSError):
                    if call(url + "/health", timeout=2)[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vitkit serve did not answer in {STARTUP_S} s:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()  # SIGTERM: uvicorn shuts down cleanly, the batch worker is stopped
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def call(url: str, data=None, headers: dict | None = None, method: str | None = None, timeout: float = 60):
    """(status, JSON body) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(field: str, filename: str, content: bytes, content_type: str) -> tuple[bytes, dict]:
    """A multipart/form-data body with one file, and its headers."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
