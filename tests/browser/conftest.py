"""Fixtures for the browser tests: one Jupyter server, one headless Chromium, and a
client that reads values straight from the notebook's kernel."""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "widget_tour.ipynb"
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", REPO / "tests" / "browser" / "artifacts"))
SERVER_START_TIMEOUT = 60
KERNEL_TIMEOUT = 120


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a real browser against a Jupyter server")


def wait_for(condition, timeout, interval=0.1, message="condition"):
    """Call `condition` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterServer:
    """A Jupyter server (JupyterLab and Notebook 7 front ends) on a temp root dir."""

    def __init__(self, base: Path):
        self.root = base / "root"
        self.runtime = base / "runtime"
        self.config = base / "config"
        for folder in (self.root, self.runtime, self.config):
            folder.mkdir()
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / "jupyter-server.log"
        self.process: subprocess.Popen | None = None

    def _write_lab_settings(self) -> None:
        """No news and update checks: nothing to fetch offline, no toast over the page."""
        folder = self.config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        folder.mkdir(parents=True)
        settings = {"fetchNews": "false", "checkForUpdates": False}
        (folder / "notification.jupyterlab-settings").write_text(json.dumps(settings))

    def start(self) -> None:
        self._write_lab_settings()
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(self.runtime))
        env["JUPYTER_CONFIG_DIR"] = str(self.config)
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",
            "--JupyterNotebookApp.expose_app_in_browser=True",
        ]
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self._ready, SERVER_START_TIMEOUT, 0.25, "the Jupyter server to start")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"Jupyter server exited; see {self.log_path}")
        try:
            self.api("status")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def page_url(self, app_path: str) -> str:
        return f"{self.url}/{app_path}?token={self.token}"

    def copy_notebook(self) -> str:
        """A fresh copy of the example notebook in the root dir; its server path."""
        if not NOTEBOOK.exists():
            pytest.fail(f"{NOTEBOOK} is missing")
        shutil.copy(NOTEBOOK, self.root / NOTEBOOK.name)
        return NOTEBOOK.name

    def kernel_for(self, path: str) -> Kernel:
        def kernel_id():
            sessions = [s for s in self.api("sessions") if s["path"] == path]
            return sessions[0]["kernel"]["id"] if sessions else None

        found = wait_for(kernel_id, KERNEL_TIMEOUT, 0.25, f"a kernel for {path}")
        connection = wait_for(
            lambda: (
                (self.runtime / f"kernel-{found}.json").exists()
                and self.runtime / f"kernel-{found}.json"
            ),
            KERNEL_TIMEOUT,
            0.25,
            "the kernel's connection file",
        )
        return Kernel(connection)

    def shut_down_sessions(self) -> None:
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")


class KernelError(RuntimeError):
    pass


class Kernel:
    """Runs code and evaluates expressions in a running kernel, as a second client."""

    def __init__(self, connection_file: Path):
        from jupyter_client import BlockingKernelClient

        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=KERNEL_TIMEOUT)

    def _reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]

    def run(self, code: str, timeout: float = KERNEL_TIMEOUT) -> None:
        """Execute statements; raise if they fail."""
        content = self._reply(self.client.execute(code, silent=True), timeout)
        if content["status"] != "ok":
            raise KernelError(f"{code!r} failed: {content.get('ename')}: {content.get('evalue')}")

    def eval(self, expression: str, timeout: float = KERNEL_TIMEOUT):
        """The value of a Python expression whose repr is a literal."""
        msg_id = self.client.execute("", silent=True, user_expressions={"value": expression})
        result = self._reply(msg_id, timeout)["user_expressions"]["value"]
        if result["status"] != "ok":
            raise KernelError(f"{expression!r} failed: {result['ename']}: {result['evalue']}")
        return ast.literal_eval(result["data"]["text/plain"])

    def wait_until(self, expression: str, timeout: float = 60):
        """Poll a boolean expression until it is true."""
        return wait_for(lambda: self.eval(expression), timeout, 0.2, expression)

    def close(self) -> None:
        self.client.stop_channels()


@pytest.fixture(scope="session")
def jupyter(tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = JupyterServer(tmp_path_factory.mktemp("jupyter"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, jupyter):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()
    jupyter.shut_down_sessions()


@pytest.fixture
def screenshot(page, request):
    """screenshot("step") saves the page as <test name>-<n>-step.png."""
    count = 0

    def save(step: str) -> Path:
        nonlocal count
        count += 1
        path = ARTIFACTS / f"{request.node.name}-{count}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save
