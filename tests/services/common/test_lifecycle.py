"""A service process's start-up: the garbage collector is settled once start-up is over."""

from __future__ import annotations

import subprocess
import sys

from visiona_services.common.lifecycle import GC_THRESHOLDS


def test_a_service_settles_the_collector_once_it_runs() -> None:
    """``serve_until_signal`` freezes what start-up made and widens the young generation
    (in a process of its own: the collector's settings are process-wide)."""
    check = """
import gc, signal, os, trio, trio.testing
from visiona_services.common.lifecycle import serve_until_signal
import logging

class Running:
    stop = staticmethod(lambda: None)

async def serve(config, *, task_status):
    task_status.started(Running())
    await trio.testing.wait_all_tasks_blocked()  # serve_until_signal has gone on
    print(gc.get_threshold(), gc.get_freeze_count() > 0, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

trio.run(serve_until_signal, serve, None, logging.getLogger("x"))
"""
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split("\n")[0] == f"{GC_THRESHOLDS} True"
