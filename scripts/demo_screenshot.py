#!/usr/bin/env python
"""Screenshot the demo page in headless Chromium after it has answered.

    python scripts/demo_screenshot.py --out demo.png            # starts `somelvlm demo` (tiny model)
    python scripts/demo_screenshot.py --url http://127.0.0.1:7860 --out demo.png   # a running demo

Drives a real browser over the DevTools protocol (needs Debian's `chromium` and `websockets`):
loads the page, clicks "Answer", waits until the parsed options appear, then saves a PNG and
prints what the page showed. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1000"]
READ_PAGE = """(() => {
  const answer = document.querySelector('#answer textarea');
  const parsed = document.querySelector('#parsed');
  const warning = document.querySelector('#random-weights-warning');
  return JSON.stringify({answer: answer ? answer.value : null, parsed: parsed ? parsed.innerText : '',
                         warning: warning ? warning.innerText : ''});
})()"""
CLICK = "(() => { const b = document.querySelector('#answer-button'); if (b) b.click(); return !!b; })()"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    """A minimal DevTools-protocol session with one page."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def screenshot(url: str, out: Path, chromium: str | None = None, timeout: float = 90.0) -> dict:
    """Open `url`, click Answer, wait for the parsed options, save a PNG at `out`; returns what the
    page showed: {"answer", "parsed", "warning"}."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix="somelvlm-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--remote-debugging-address=127.0.0.1", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        _wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), timeout, "chromium to start")
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            tools = DevTools(ws)
            tools.call("Page.enable")
            tools.call("Page.navigate", url=url)
            _wait_for(lambda: tools.evaluate(CLICK), timeout, "the demo page to load")
            shown = _wait_for(lambda: (lambda s: s if s["answer"] and "Parsed answer" in s["parsed"] else None)(
                json.loads(tools.evaluate(READ_PAGE))), timeout, "the answer")
            png = tools.call("Page.captureScreenshot", format="png")["data"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(png))
            return shown
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running demo (default: start `somelvlm demo` with --model)")
    parser.add_argument("--model", default="tiny", help="model for the started demo (default: tiny)")
    parser.add_argument("--out", type=Path, default=Path("demo.png"), help="PNG to write (default: demo.png)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each step")
    args = parser.parse_args()
    demo = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        demo = subprocess.Popen([sys.executable, "-m", "somelvlm", "demo", "--model", args.model, "--port", str(port)],
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        _wait_for(lambda: _up(url), args.timeout, "the demo to start")
    try:
        shown = screenshot(url, args.out, timeout=args.timeout)
    except (FileNotFoundError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait(timeout=30)
    print(json.dumps({"screenshot": str(args.out), **shown}, ensure_ascii=False, indent=2))
    return 0


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
