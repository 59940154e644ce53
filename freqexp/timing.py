"""Where a run's wall time goes: named phases, timed once each, reported with the run.

`marks` holds wall-clock instants (time.time()) of the process's milestones (the entry point
reached, the task called), so a caller that started the process can split its start-up from
the run itself (benchmarks/run_breakdown.py)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

marks: Dict[str, float] = {}


def wait_for_device(device) -> None:
    """Block until a CUDA `device` has run the work queued on it, so that a clock read next covers
    that work; nothing on other devices (a CPU runs its work before returning)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def started_after_boot(pid: int | str = "self") -> float:
    """When process `pid` started, in seconds after the machine booted (the kernel's clock ticks,
    10 ms), from /proc; raises OSError (FileNotFoundError: no such process, or no /proc),
    IndexError or ValueError where it cannot be read."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22, after "pid (name)"


def seconds_since_start() -> Optional[float]:
    """How long this process has run (to 10 ms), or None where the system cannot say (no /proc)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot()
    except (OSError, AttributeError, IndexError, ValueError):
        return None


def mark(name: str) -> None:
    """Record that the process reached `name` now (the first time only)."""
    marks.setdefault(name, time.time())


class Phases:
    """Seconds spent in each phase of one run, in the order the phases began."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.started = time.time()
        self.before = seconds_since_start()  # the process before this run: Python, imports, the command line, the config

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> Dict[str, float]:
        """sys/seconds_<phase> for MLflow, and sys/seconds_outside_fit: all but the fit."""
        out = {f"sys/seconds_{name}": s for name, s in self.seconds.items()}
        out["sys/seconds_outside_fit"] = sum(s for name, s in self.seconds.items() if name != "fit")
        return out

    def record(self) -> Dict[str, object]:
        """What timing.json holds: the phases, and the process marks with this run's start/end instants."""
        return {"phases": dict(self.seconds), "marks": {**marks, "run_start": self.started, "run_end": time.time()},
                "pid": os.getpid()}
