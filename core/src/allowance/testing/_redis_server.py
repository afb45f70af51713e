"""A throwaway ``redis-server`` on 127.0.0.1, for tests of Redis ledgers.

It runs the real binary (found on ``PATH``) on a free port in a temporary
directory, with persistence off, and can be stopped, killed and started again
on the same port, which is how the fault tests take Redis away mid-run.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from allowance._errors import ConfigurationError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["RedisServer"]

_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0


class RedisServer:
    """A ``redis-server`` process of the test's own, on a free local port.

    Args:
        binary: The server to run; default ``redis-server`` on ``PATH``.
        port: The port; default a free one, chosen at the first start.

    Example:
        >>> if RedisServer.available():  # doctest: +SKIP
        ...     with RedisServer() as server:
        ...         ledger = open_ledger(server.url)
    """

    __module__ = "allowance.testing"

    def __init__(self, *, binary: str | None = None, port: int | None = None) -> None:
        """Configure the server; it starts with ``start()`` or ``with``."""
        found = binary or shutil.which("redis-server")
        if found is None:
            what, expected = "redis-server", "a redis-server binary on PATH"
            raise ConfigurationError(what, None, expected)
        self.binary = found
        self.port = port
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Return True when a ``redis-server`` binary is on ``PATH``."""
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        if self.port is None:
            msg = "RedisServer.url: start the server first"
            raise RuntimeError(msg)
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def directory(self) -> Path:
        """The server's working directory (its log and any dump file)."""
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix="allowance-redis-")
        return Path(self._directory.name)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server (again on the same port) and wait until it answers.

        A dump left by ``stop(save=True)`` is loaded back.

        Raises:
            RuntimeError: The server did not answer PING within 10 s.
        """
        if self.running:
            return self
        if self.port is None:
            self.port = _free_port()
        directory = self.directory
        self._process = subprocess.Popen(  # noqa: S603 - a fixed argument list
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                _HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(directory / "redis.log"),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self.command("PING") == "PONG":
                    return self
            time.sleep(0.02)
        log = directory / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.kill()
        msg = f"redis-server on port {self.port} did not start: {tail}"
        raise RuntimeError(msg)

    def stop(self, *, save: bool = False) -> None:
        """Stop the server; with ``save``, dump the data for the next start."""
        process = self._process
        if process is None:
            return
        if save and process.poll() is None:
            self.command("SAVE")
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        self._process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        self._process = None

    def restart(self, *, save: bool = True) -> None:
        """Stop the server and start it again on the same port."""
        self.stop(save=save)
        self.start()

    def command(self, *args: str) -> str:
        """Send one command and return its simple reply (``"PONG"``, ``"OK"``).

        Raises:
            OSError: The server cannot be reached.
            RuntimeError: The server answered with an error.
        """
        request = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((_HOST, self.port or 0), timeout=5) as conn:
            conn.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        text = reply.decode(errors="replace").strip()
        if text.startswith("-"):
            msg = f"redis-server on port {self.port}: {text[1:]}"
            raise RuntimeError(msg)
        return text.lstrip("+:")

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.kill()
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self) -> Self:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server and delete its directory."""
        self.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])
