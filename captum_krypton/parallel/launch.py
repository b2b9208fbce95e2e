"""Ranks on one machine without torchrun: this process is rank 0 and starts the
others as copies of its own command.

torchrun's agent is one more process that imports torch before any rank starts,
and the ranks then start together, so every rank pays the whole start before
the first item. Here the other ranks start first, while this process imports,
loads the model and takes items; the work queue lets them join when ready.
Measured on two H200s, the launch costs that torchrun adds were most of what kept
a data-set run from its second GPU's speedup (docs/scaling.md).

Ctrl-C reaches every rank (one process group); each prints its line and stops,
and this process waits for them. A rank that fails stops the run with its exit
status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

#: How long ranks get to stop after Ctrl-C before they are killed (seconds).
STOP_GRACE_SECONDS = 30.0


class RankFailed(RuntimeError):
    """Another rank of a local run exited with an error."""

    def __init__(self, rank: int, status: int):
        super().__init__(f"rank {rank} exited with status {status}; its output is above")
        self.status = status


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRanks:
    """Ranks 1..N-1 of a local run, started by `start`; this process joins as
    rank 0 through the environment variables torchrun would set."""

    def __init__(self, command: Sequence[str], processes: int):
        if processes < 1:
            raise ValueError("--nproc-per-node must be at least 1")
        self.processes = processes
        self.command = list(command)
        self.children: list[subprocess.Popen] = []
        self._running = False

    def start(self) -> None:
        shared = {
            "WORLD_SIZE": str(self.processes),
            "LOCAL_WORLD_SIZE": str(self.processes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # as torchrun sets
        }
        for rank in range(1, self.processes):
            env = dict(os.environ, **shared, RANK=str(rank), LOCAL_RANK=str(rank))
            self.children.append(subprocess.Popen(self.command, env=env))
        os.environ.update(shared, RANK="0", LOCAL_RANK="0")
        threading.Thread(target=self._watch_start, daemon=True).start()

    def _watch_start(self) -> None:
        """Until this rank takes its first item it may wait on the others (joining
        the process group, sharing the list of items): a rank that fails then
        ends the run here, rather than leaving this one waiting."""
        while not self._running:
            for rank, child in enumerate(self.children, 1):
                status = child.poll()
                if status not in (None, 0):
                    print(f"rank {rank} exited with status {status}; stopping", file=sys.stderr)
                    self.stop()
                    os._exit(status if status > 0 else 1)
            time.sleep(0.1)

    def check(self) -> None:
        """Raise RankFailed if another rank has exited with an error."""
        self._running = True
        for rank, child in enumerate(self.children, 1):
            status = child.poll()
            if status not in (None, 0):
                raise RankFailed(rank, status)

    def wait(self) -> None:
        """Until every other rank has exited; RankFailed for the first that failed."""
        while any(child.poll() is None for child in self.children):
            self.check()
            time.sleep(0.05)
        self.check()

    def stop(self) -> None:
        """Ask the ranks still running to stop (Ctrl-C), and wait for them. A
        Ctrl-C in a terminal has reached them already: they get a moment to stop
        on their own before this one passes it on."""
        deadline = time.monotonic() + 1.0
        while any(c.poll() is None for c in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in self.children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def rank_command(argv: Sequence[str]) -> list[str]:
    """The command the other ranks run: this one without --nproc-per-node."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        kept.append(arg)
    return [sys.executable, "-m", "captum_krypton", *kept]
