"""Running the ``lookalike`` CLI in process, as its console script does."""

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

import pytest


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Exit code of ``lookalike ARGS`` (use with the ``restore_logging`` fixture)."""
    from service import cli

    monkeypatch.setattr(sys, "argv", ["lookalike", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving(
    catalog: Path, log: Path, *options: str, exits: list[int | None] | None = None
) -> Iterator[tuple[str, int]]:
    """`lookalike serve` over ``catalog`` (with ``options``) on a free loopback port, rate
    limit off, in a child process; its URL and process id. Stopped by SIGTERM at the end
    (its exit status is appended to ``exits``)."""
    port = free_port()
    script = Path(sys.executable).with_name("lookalike")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    command += ["serve", "--catalog", str(catalog), "--host", "127.0.0.1", "--port", str(port)]
    command += options
    env = dict(os.environ, LOOKALIKE_RATE_LIMIT_PER_S="0", HF_HUB_OFFLINE="1")
    with open(log, "ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    break
            time.sleep(0.1)
        yield url, server.pid
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if exits is not None:
            exits.append(server.returncode)


def writable_copy(catalog: Path, where: Path) -> tuple[Path, list[str]]:
    """A copy of ``catalog`` under ``where`` for a server to write feedback to, and its ids."""
    from indexer.catalog import Catalog

    copy = where / "catalog"
    shutil.copytree(catalog, copy)
    with Catalog.open(copy) as opened:
        return copy, [item.id for item in opened.iter_items()]
