"""Open an HTML page in headless Chromium and report what a reader would see (test helper).

Drives Debian's `chromium` over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
commands on fd 3, replies on fd 4, each a JSON text ended by a NUL byte), so nothing beyond the
standard library is needed. `render(page, png)` loads the page, waits for its load event, then
returns the page's headings, tables and images as the browser laid them out, every console
error, and a full-page screenshot written to `png`.

    python tests/browser.py RUN/report.html   # writes RUN/report.png and prints the checks
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: What the page looks like to a reader, measured in the page after its load event.
PROBE = """JSON.stringify({
  title: document.title,
  headings: [...document.querySelectorAll('h1,h2')].map(h => h.textContent),
  viewport: window.innerWidth,
  page_width: document.documentElement.scrollWidth,
  tables: [...document.querySelectorAll('table')].map(t => ({
    after: (function(){ let e = t.parentElement.tagName === 'DIV' ? t.parentElement : t;
                        e = e.previousElementSibling;
                        while (e && e.tagName !== 'H2') e = e.previousElementSibling;
                        return e ? e.textContent : ''; })(),
    rows: [...t.rows].map(r => [...r.cells].map(c => c.textContent)),
    content_width: t.scrollWidth,
    shown_width: t.clientWidth,
    wrapped_cells: [...t.querySelectorAll('td,th')].filter(c => {
      const r = document.createRange(); r.selectNodeContents(c);
      return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size > 1; }).length,
  })),
  images: [...document.images].map(i => ({
    alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
    shown: [i.getBoundingClientRect().width, i.getBoundingClientRect().height],
  })),
})"""


def chromium() -> str | None:
    """Path of the chromium binary, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Pipe:
    """One DevTools connection: numbered requests, replies matched by id, events kept."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, since: int = 0) -> dict[str, Any]:
        """The first `method` event from `self.events[since]` on, waiting for it if needed."""
        for event in self.events[since:]:
            if event.get("method") == method:
                return event
        while True:
            event = self._message()
            self.events.append(event)
            if event.get("method") == method:
                return event


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads the page produced."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"{p['entry']['source']}: {p['entry']['text']}")
    return out


def render(page: str | Path, png: str | Path, *, width: int = 1280, height: int = 900, timeout: float = 60.0) -> dict[str, Any]:
    """Load `page` in headless Chromium at `width` CSS px, write a full-page screenshot to `png`;
    returns PROBE's measurements plus "errors" (console errors, exceptions, failed loads)."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # The child's ends move above fd 9, so placing them at 3 and 4 below cannot clobber them.
    to_chrome_r, from_chrome_w = _above_9(to_chrome_r), _above_9(from_chrome_w)
    with tempfile.TemporaryDirectory(prefix="diffmix-chromium-") as profile:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        # The protocol pipe must be fds 3 (to chromium) and 4 (from it) in the child.
        wrapper = ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-', "bash"]
        proc = subprocess.Popen(wrapper + args, pass_fds=(to_chrome_r, from_chrome_w),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        cdp = _Pipe(to_chrome_w, from_chrome_r, time.monotonic() + timeout)
        try:
            target = cdp.send("Target.createTarget", url="about:blank")["targetId"]
            session = cdp.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.send(f"{domain}.enable", session)
            cdp.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
            before = len(cdp.events)  # only this navigation's load event counts
            cdp.send("Page.navigate", session, url=Path(page).resolve().as_uri())
            cdp.wait_for("Page.loadEventFired", since=before)
            probe = cdp.send("Runtime.evaluate", session, expression=PROBE, returnByValue=True)
            if "exceptionDetails" in probe:
                raise RuntimeError(f"the page probe failed: {probe['exceptionDetails']}")
            found = json.loads(probe["result"]["value"])
            size = cdp.send("Page.getLayoutMetrics", session)["cssContentSize"]
            shot = cdp.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            Path(png).write_bytes(base64.b64decode(shot["data"]))
            found["errors"] = _console_errors(cdp.events)
            try:
                cdp.send("Browser.close")
            except RuntimeError:  # the pipe closes as the browser goes: that is the answer
                pass
        finally:
            os.close(to_chrome_w)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(from_chrome_r)
    return found


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        report = Path(arg)
        seen = render(report, report.with_suffix(".png"))
        print(json.dumps({k: v for k, v in seen.items() if k != "tables"}, indent=1))
        for t in seen["tables"]:
            print(f"table after {t['after']!r}: {len(t['rows'])} rows, {t['content_width']} px shown in "
                  f"{t['shown_width']} px, {t['wrapped_cells']} cells wrapped")
        print("screenshot:", report.with_suffix(".png"))
