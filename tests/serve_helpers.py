"""Starting a real `somelvlm serve` / `somelvlm demo` process on 127.0.0.1 for tests and benchmarks."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ServerProcess:
    """`python -m somelvlm COMMAND ARGS --port P` in a subprocess, ready when `ready_path` answers 200."""

    def __init__(self, command: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 ready_path: str = "/health", threads: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "somelvlm", command, "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        self.wait_ready(ready_path)

    def wait_ready(self, path: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ThreadServer:
    """`somelvlm serve ARGS` run in-process: the real CLI parsing, app and uvicorn server, on a thread
    (the test process has torch imported already, which saves the subprocess's start-up)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        import threading

        from somelvlm.cli import build_parser, load_model
        from somelvlm.serve.cli import build_server, check_serve_arguments

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            parsed = build_parser().parse_args(["serve", "--port", str(self.port), *args])
            check_serve_arguments(parsed)
            self.server = build_server(parsed, load_model(parsed))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
