"""The HTML report in a real browser: headless Chromium, driven over the DevTools protocol.

Chromium runs with `--remote-debugging-pipe` (DevTools messages on file descriptors 3/4, NUL
separated), so no websocket client or browser-automation package is needed. A page fails on any
uncaught exception, `console.error`/`console.assert` call or browser log entry of level "error", and
unless every plotly graph div rendered its SVG. Screenshots go to tmp_path and, when DNAD_ARTIFACTS is
set, are copied there.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_figures import make_run_folder

from dnad.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DNAD_CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT = 1400, 3000
RENDERED_JS = """(() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return {ready: document.readyState, divs: divs.length, plotly: typeof window.Plotly !== 'undefined',
          rendered: divs.filter(d => d.querySelector('.main-svg')).length,
          missing: divs.filter(d => !d.querySelector('.main-svg')).map(d => d.id)};
})()"""


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    screenshot: Path | None = None


class Chromium:
    """One headless Chromium; `open(path)` loads a page and reports errors and rendering."""

    def __init__(self, binary: str = CHROMIUM):
        self._profile = tempfile.TemporaryDirectory(prefix="dnad-chromium-")
        cmd_r, cmd_w = os.pipe()  # we write commands -> Chromium reads fd 3
        ev_r, ev_w = os.pipe()  # Chromium writes fd 4 -> we read

        def child_fds() -> None:  # runs in the child: put the pipe ends on 3 and 4
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(ev_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={self._profile.name}",
                "--remote-debugging-pipe", f"--window-size={WIDTH},{HEIGHT}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(
            args, preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(cmd_r)
        os.close(ev_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(ev_r, "rb", buffering=0)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buf = b""
        while chunk := self._r.read(1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self._q.put(json.loads(m))
        self._q.put(None)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            try:
                m = self._q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"chromium did not answer {method} in {timeout}s") from None
            if m is None:
                raise RuntimeError(f"chromium exited (rc {self.proc.poll()}) during {method}")
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def drain(self) -> None:
        while True:
            try:
                m = self._q.get_nowait()
            except queue.Empty:
                return
            if m is not None:
                self.events.append(m)

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries seen so far."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')} "
                           f"({d.get('url', '')}:{d.get('lineNumber')})")  # fmt: skip
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                out.append(f"console.{p['type']}: {args}")
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def open(self, page: Path, screenshot: Path | None = None, timeout: float = 90) -> PageResult:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.send(m, session=s)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=s)  # fmt: skip
        self.events.clear()
        self.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        end, state = time.monotonic() + timeout, {}
        while time.monotonic() < end:
            r = self.send("Runtime.evaluate", {"expression": RENDERED_JS, "returnByValue": True}, session=s)
            state = r.get("result", {}).get("value") or {}
            if state.get("ready") == "complete":
                self.drain()
                # done: everything drawn, or nothing more will be (no plotly.js, or the page threw)
                if state.get("rendered") == state.get("divs") or not state.get("plotly") or self.errors():
                    break
            time.sleep(0.25)
        time.sleep(0.5)  # late errors (plotly draws asynchronously)
        self.drain()
        result = PageResult(errors=self.errors(), state=state)
        if screenshot is not None:
            m = self.send("Page.getLayoutMetrics", session=s)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": WIDTH, "height": min(int(m["height"]), 16000), "scale": 1}
            shot = self.send("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True, "clip": clip}, session=s)  # fmt: skip
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            result.screenshot = screenshot
        self.send("Target.closeTarget", {"targetId": target})
        return result

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._w.close()
        self._profile.cleanup()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (make browser installs it)")
    b = Chromium()
    yield b
    b.close()


def keep_artifact(path: Path, name: str) -> None:
    dest = os.environ.get("DNAD_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / name)


def assert_clean_render(result: PageResult) -> None:
    assert result.errors == [], "JavaScript errors:\n" + "\n".join(result.errors)
    st = result.state
    assert st.get("ready") == "complete", st
    assert st.get("divs", 0) >= 3 and st.get("rendered") == st.get("divs"), f"not rendered: {st}"


def test_a_javascript_error_is_detected(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<html><body><div class='plotly-graph-div'></div><script>throw new Error('x')</script></body></html>"
    )
    r = browser.open(page)
    assert any("exception" in e and "Error: x" in e for e in r.errors), r.errors
    assert r.state["divs"] == 1 and r.state["rendered"] == 0  # an empty graph div counts as not rendered
    page.write_text("<html><body><script>console.error('broken', 42)</script></body></html>")
    assert any(e.startswith("console.error: broken 42") for e in browser.open(page).errors)
    page.write_text("<html><body><script>console.log('fine')</script></body></html>")
    assert browser.open(page).errors == []


def test_synthetic_report_renders_without_errors(browser, tmp_path):
    archs = make_run_folder(tmp_path / "run")
    report = write_report(tmp_path / "run")
    r = browser.open(report, screenshot=tmp_path / "report.png")
    assert_clean_render(r)
    pareto = int((archs["is_pareto_macs"] | archs["is_pareto_params"] | archs["is_pareto_latency"]).sum())
    assert r.state["divs"] == 4 + pareto  # three Pareto plots, dynamics, one cell diagram per Pareto arch
    assert r.screenshot is not None and r.screenshot.stat().st_size > 50_000
    keep_artifact(r.screenshot, "report-synthetic.png")


def test_smoke_run_report_renders_without_errors(browser, smoke_run, tmp_path):
    report = smoke_run / "report.html"
    assert report.is_file(), "pipeline/run.py did not write report.html"
    r = browser.open(report, screenshot=tmp_path / "report-smoke.png")
    assert_clean_render(r)
    keep_artifact(report, "report-smoke.html")
    keep_artifact(r.screenshot, "report-smoke.png")
