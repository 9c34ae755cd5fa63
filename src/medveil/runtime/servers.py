"""Run a hub (uvicorn in a thread) and nodes (threads or processes) on this machine."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

from medveil.crypto.signing import SigningKey, VerifyKey
from medveil.runtime.auth import make_invitation
from medveil.runtime.config import load_site_config
from medveil.runtime.hub import RETENTION_S, create_hub_app
from medveil.runtime.hub_store import HubStore
from medveil.runtime.node import Node
from medveil.runtime.wire import DEFAULT_MAX_BYTES

INVITATION_TTL_S = 7 * 24 * 3600.0


class HubServer:
    """A real hub on a loopback port, stoppable and restartable on the same port and store.

    Parties enrol with invitations signed by `operator_key`; without one, the server makes an
    operator key of its own and `invite` signs with it (simulations, benchmarks). The relayed
    traffic of tasks finished more than `retention_s` ago is pruned (see `create_hub_app`)."""

    def __init__(self, db_url: str, *, operator_key: VerifyKey | None = None, host: str = "127.0.0.1",
                 port: int = 0, record_traffic: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                 retention_s: float = RETENTION_S):
        self.operator: SigningKey | None = None
        if operator_key is None:
            self.operator = SigningKey.generate()
            operator_key = self.operator.verify_key
        self.operator_key = operator_key
        self.db_url = db_url
        self.host = host
        self.port = port
        self.record_traffic = record_traffic
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.store: HubStore | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def invite(self, party: str, role: str, public_key: str | None = None, ttl_s: float = INVITATION_TTL_S) -> str:
        """An invitation signed by this server's own operator key."""
        if self.operator is None:
            raise RuntimeError("this hub's operator key is held elsewhere; invite with `medveil hub invite`")
        return make_invitation(self.operator, party, role, time.time() + ttl_s, public_key)

    def start(self) -> "HubServer":
        self.store = HubStore(self.db_url)
        app = create_hub_app(self.store, operator_key=self.operator_key, max_bytes=self.max_bytes,
                             record_traffic=self.record_traffic, retention_s=self.retention_s)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio then enables TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._notifier = app.state.notifier

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[sock])  # type: ignore[union-attr]

        def run() -> None:
            # uvicorn's loop choice (uvloop when installed), as uvicorn.Server.run would make it.
            with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
                runner.run(serve())

        self._thread = threading.Thread(target=run, name="medveil-hub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the hub did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notifier.close)
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.store is not None:
            self.store.close()
        self._server = None


class NodeThread:
    """A node polling in a background thread of this process."""

    def __init__(self, node: Node):
        self.node = node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=node.serve, args=(self._stop,), name=f"node-{node.site}", daemon=True)

    def start(self) -> "NodeThread":
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        """Ask the node to stop after its current long-poll, without waiting."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)
        self.node.close()


class NodeProcess:
    """A node as its own OS process (`medveil node start`), for isolation and crash tests."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def polling_marker(self) -> Path:
        """The file a node writes when its polling loop starts."""
        return load_site_config(self.config_path).state_dir / "polling"

    def start(self) -> "NodeProcess":
        self.polling_marker.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medveil", "node", "start", "--config", str(self.config_path), "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        return self

    def wait_until_polling(self, timeout: float = 120.0) -> None:
        """Block until the node's polling loop has started; `timeout` only bounds a hang."""
        deadline = time.monotonic() + timeout
        while not self.polling_marker.exists():
            if time.monotonic() > deadline or self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"node of {self.config_path} did not start polling; see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
