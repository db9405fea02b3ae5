"""Open a report in headless Chromium and check what a reader would hit: console errors,
requests that leave the file (a report must work offline), elements wider than the
viewport, images that do not decode, links to files that do not exist. Optionally a
screenshot of the first screen.

Talks the DevTools protocol over a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), so it needs nothing but the browser.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

_CHECKS_JS = """(() => {
  const vw = document.documentElement.clientWidth;
  const scrolls = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden') return true; }
    return false; };
  const wide = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 1 && !scrolls(el))
      wide.push(`${el.tagName.toLowerCase()} ${Math.round(r.right)}px`);
  }
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => i.src.slice(0, 80));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return JSON.stringify({viewport: vw, scroll_width: document.documentElement.scrollWidth,
                         too_wide: wide.slice(0, 10), broken_images: broken,
                         images: document.images.length, links,
                         title: document.title, answer: !!document.querySelector('.answer')});
})()"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int) -> None:
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        wanted = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            reply = None
            for msg in self._read(deadline):  # keep every event read with the reply
                if msg.get("id") == wanted:
                    reply = msg
                else:
                    self.events.append(msg)
            if reply is not None:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.events):
                if msg.get("method") == method:
                    return self.events.pop(i)
            self.events.extend(self._read(deadline))

    def _read(self, deadline: float) -> list[dict]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the browser did not answer in time")
        ready, _, _ = select.select([self.read_fd], [], [], left)
        if not ready:
            raise TimeoutError("the browser did not answer in time")
        chunk = os.read(self.read_fd, 1 << 20)
        if not chunk:
            raise RuntimeError("the browser closed the DevTools pipe")
        self.buffer += chunk
        *messages, self.buffer = self.buffer.split(b"\0")
        return [json.loads(m) for m in messages if m]


def check_report(path: str | os.PathLike, screenshot: str | os.PathLike | None = None,
                 width: int = 1280, height: int = 900, timeout: float = 90) -> dict:
    """Load `path` (an HTML file) and return what was found: errors (console and page
    errors), external_requests, too_wide (elements past a `width` px viewport outside
    a scroll box), broken_images, missing_links (relative links to absent files), and
    the page's title / images count. Raises RuntimeError when no browser is installed."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found (Debian: apt-get install chromium)")
    path = Path(path).resolve()
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def fds() -> None:  # the browser reads commands on fd 3 and writes on fd 4
        # copies first (either pipe end may itself be fd 3 or 4), then inheritable ones
        read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    with tempfile.TemporaryDirectory(prefix="harmonize-browser-",
                                     ignore_cleanup_errors=True) as profile:
        try:  # its own session: helper processes are ended with it
            proc = subprocess.Popen(
                [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                 "--remote-debugging-pipe", "--no-first-run", "--disable-extensions",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 "about:blank"],
                preexec_fn=fds, close_fds=False, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        pipe = _Pipe(proc, to_browser_w, from_browser_r)
        try:
            return _inspect(pipe, path, screenshot, width, height, timeout)
        finally:
            try:
                os.write(to_browser_w, json.dumps({"id": 0, "method": "Browser.close"}
                                                  ).encode() + b"\0")
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            os.close(to_browser_w)
            os.close(from_browser_r)


def _inspect(pipe: _Pipe, path: Path, screenshot, width: int, height: int,
             timeout: float) -> dict:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True}
                        )["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                     "deviceScaleFactor": 1,
                                                     "mobile": False}, session=session)
    pipe.events.clear()  # about:blank's own load event must not count as the report's
    pipe.send("Page.navigate", {"url": path.as_uri()}, session=session)
    pipe.wait_event("Page.loadEventFired", timeout)
    pipe.send("Runtime.evaluate", {"expression": "Promise.all([...document.images].map("
                                   "i => i.decode().catch(() => null)))",
                                   "awaitPromise": True}, session=session, timeout=timeout)
    found = json.loads(pipe.send("Runtime.evaluate", {"expression": _CHECKS_JS,
                                                      "returnByValue": True},
                                 session=session)["result"]["value"])
    if screenshot is not None:
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
    errors, external = [], []
    for msg in pipe.events:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", "")) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:", "about:")):
                external.append(url)
    missing = []
    for link in found.pop("links"):
        parsed = urlparse(link)
        if parsed.scheme == "file" and not Path(unquote(parsed.path)).exists():
            missing.append(link)
        elif parsed.scheme not in ("file", "data", "about", ""):
            external.append(link)
    return {**found, "errors": errors, "external_requests": external,
            "missing_links": missing}


def problems(result: dict) -> list[str]:
    """The findings of `check_report` a report must not have, as sentences."""
    out = []
    for key, text in (("errors", "console errors"), ("external_requests",
                                                      "requests outside the file"),
                      ("too_wide", f"elements wider than {result.get('viewport')} px"),
                      ("broken_images", "images that do not decode"),
                      ("missing_links", "links to missing files")):
        if result.get(key):
            out.append(f"{text}: {result[key][:5]}")
    if result.get("scroll_width", 0) > result.get("viewport", 0) + 1:
        out.append(f"the page scrolls sideways ({result['scroll_width']} px)")
    return out
