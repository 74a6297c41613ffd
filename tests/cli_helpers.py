"""Running the ``lookalike`` CLI in process, as its console script does."""

from __future__ import annotations

import sys

import pytest


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Exit code of ``lookalike ARGS`` (use with the ``restore_logging`` fixture)."""
    from service import cli

    monkeypatch.setattr(sys, "argv", ["lookalike", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)
