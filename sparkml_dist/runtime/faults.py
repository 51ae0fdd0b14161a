"""Fault injection for tests and drills: a rank kills or stops its own process at a given step.

Off by default (``launch.fault_kind=none``) and only ever on attempt 0, so the retry that follows runs
clean. ``kill`` is a SIGKILL (the process is lost: no Python cleanup, no finally blocks), ``stop`` a
SIGSTOP (the process hangs, holding its sockets, until someone SIGCONTs or SIGKILLs it), ``hang`` an
endless sleep in the step loop (alive: its heartbeat thread goes on, its peers wait in a collective), ``slow`` a
straggler (the rank sleeps ``launch.fault_delay_s`` before every step from ``fault_step`` on). Runs
inside a rank; pure standard library.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from sparkml_dist.config import LaunchConfig
from sparkml_dist.errors import InfraError

_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def maybe_inject(cfg: LaunchConfig, rank: int, attempt: int, global_step: int) -> None:
    """SIGKILL/SIGSTOP this process if ``cfg`` asks for a fault here (rank, step, attempt 0); sleep
    ``cfg.fault_delay_s`` when this rank is the configured straggler (``slow``) and the step has come."""
    if cfg.fault_kind == "slow":
        if rank == cfg.fault_rank and global_step >= cfg.fault_step:
            time.sleep(cfg.fault_delay_s)
        return
    if cfg.fault_kind == "none" or attempt != 0 or rank != cfg.fault_rank or global_step != cfg.fault_step:
        return
    print(
        f"sparkml-dist fault injection: rank {rank} (pid {os.getpid()}) {cfg.fault_kind} at step {global_step}",
        file=sys.stderr,
        flush=True,
    )
    if cfg.fault_kind == "hang":  # alive (threads, heartbeats) but never reaching the next collective
        while True:
            time.sleep(1.0)
    os.kill(os.getpid(), _SIGNALS[cfg.fault_kind])


CRASH_AT = "SPARKML_DIST_CRASH_AT"
"""Tests only: ``name`` SIGKILLs the process at the crash point of that name, ``name:raise`` raises there."""


class InjectedCrash(InfraError):
    """Raised at a crash point named in SPARKML_DIST_CRASH_AT with ':raise'."""


def crash_point(name: str) -> None:
    """A place where a writer has written but not yet published (see tests/test_atomic.py)."""
    wanted = os.environ.get(CRASH_AT, "")
    if not wanted or wanted.split(":", 1)[0] != name:
        return
    if wanted.endswith(":raise"):
        raise InjectedCrash(f"injected crash at {name}")
    print(f"sparkml-dist crash injection: SIGKILL at {name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
