"""What the browser and Node.js tests share: the tools that tests/js/install.sh installs (Debian's chromium,
onnxruntime-web and onnxruntime-node from npm), Chromium's flags, and a static server started as a user starts one
(``python -m http.server``).

A missing tool fails the test under CI (the README's test command installs it, so its absence is a broken install
step) and skips it elsewhere, with the reason in pytest's summary: a developer's machine may lack apt-get or npm."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

JS = Path(__file__).parent / "js"
ORT_WEB = JS / "node_modules" / "onnxruntime-web"
ORT_NODE = JS / "node_modules" / "onnxruntime-node"

# headless, no sandbox (CI runs as root), nothing from the network, WebGPU on SwiftShader (software Vulkan)
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
                  "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"]


def missing(what: str) -> NoReturn:
    message = f"{what}; tests/js/install.sh installs it (the README's test command runs it)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return path or missing("no chromium (Debian's package chromium)")


def node() -> str:
    return shutil.which("node") or missing("no node (Node.js)")


def ort_web() -> Path:
    return ORT_WEB if (ORT_WEB / "dist").is_dir() else missing("onnxruntime-web is not in tests/js/node_modules")


def ort_node() -> Path:
    return ORT_NODE if (ORT_NODE / "dist").is_dir() else missing("onnxruntime-node is not in tests/js/node_modules")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``python -m http.server`` on ``folder`` (loopback only); yields its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("python -m http.server did not answer within 10 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)
