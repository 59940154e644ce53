"""Progress of long steps (feature extraction, coreset selection, scoring a split), with the
time left: a tqdm bar on a terminal, plain lines elsewhere (nohup, SLURM logs, pipes), such as
  coreset selection: 12,000/23,520 rows (51 %), 0:42 left
printed at every tenth of the work and at least every LINE_SECONDS between them, and a last
line with the step's time. Nothing shows for a step shorter than DELAY_SECONDS, nor at all
with `trainer.progress_bar=false` (`settings(enabled=False)`).

Callers update per chunk of work (a batch, a block of coreset steps), never per element, and
never synchronise a device for it: on a GPU the count is of work handed to the device, which
can run ahead of the device by a few chunks. A caller that hands a whole batch to code that
works through it in parts (a memory bank's micro-batches) opens `chunk(n)` around the call; the
code inside reports each part with `advance(k)`, which moves the innermost open chunk (and does
nothing outside one), and the chunk counts as done when it closes, reported or not."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional, TextIO

DELAY_SECONDS = 2.0  # a step done sooner shows nothing
LINE_SECONDS = 30.0  # plain lines: at least this often between the tenths
_now = time.perf_counter  # the clock (tests replace it)
_settings = {"enabled": True, "delay": DELAY_SECONDS, "line_seconds": LINE_SECONDS}
_open_chunks: list = []  # (progress, where its open chunk ends), innermost last


@contextlib.contextmanager
def settings(enabled: Optional[bool] = None, delay: Optional[float] = None, line_seconds: Optional[float] = None) -> Iterator[None]:
    """Within the block: whether progress shows, after how many seconds, and how often plain
    lines come at least; restored after it."""
    saved = dict(_settings)
    for key, value in (("enabled", enabled), ("delay", delay), ("line_seconds", line_seconds)):
        if value is not None:
            _settings[key] = value
    try:
        yield
    finally:
        _settings.clear()
        _settings.update(saved)


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress("coreset selection", total, "rows") as p: ... p.update(n) ...`; a no-op
    when progress is off or total is 0. `stream` defaults to sys.stderr at creation."""

    def __init__(self, desc: str, total: int, unit: str = "", stream: Optional[TextIO] = None):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.done = 0
        self.active = bool(_settings["enabled"]) and self.total > 0
        self.stream = sys.stderr if stream is None else stream
        self.delay, self.line_seconds = float(_settings["delay"]), float(_settings["line_seconds"])
        self.start = _now()
        self.bar = None
        self.last_line: Optional[float] = None  # when the last plain line was printed (None: none yet)
        self.next_tenth = 1
        if self.active and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=f" {unit}" if unit else "it", file=self.stream, delay=self.delay,
                            leave=False, dynamic_ncols=True, mininterval=0.5)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if not self.active:
            return
        self.done = min(self.total, self.done + int(n))
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            return
        now = _now()
        elapsed = now - self.start
        tenth = self.done * 10 // self.total
        due = tenth >= self.next_tenth or now - (self.start if self.last_line is None else self.last_line) >= self.line_seconds
        if due and 0 < self.done < self.total and elapsed >= self.delay:
            self.line(f"{clock(elapsed / self.done * (self.total - self.done))} left", now)
        self.next_tenth = max(self.next_tenth, tenth + 1)

    @contextlib.contextmanager
    def chunk(self, n: int) -> Iterator[None]:
        """The next n units are done by the code within; its advance() calls move them, and
        the chunk counts as done when the code returns (not when it raises)."""
        entry = (self, self.done + int(n))
        _open_chunks.append(entry)
        try:
            yield
        finally:
            _open_chunks.remove(entry)
        self.update(entry[1] - self.done)

    def line(self, tail: str, now: float) -> None:
        unit = f" {self.unit}" if self.unit else ""
        percent = 100 * self.done // self.total
        print(f"{self.desc}: {self.done:,}/{self.total:,}{unit} ({percent} %), {tail}", file=self.stream, flush=True)
        self.last_line = now

    def close(self) -> None:
        """Ends the display: the bar is removed; a plain report that printed lines ends with one
        giving the step's time."""
        if not self.active:
            return
        self.active = False
        if self.bar is not None:
            self.bar.close()
        elif self.last_line is not None:
            now = _now()
            self.line(f"{'done in' if self.done == self.total else 'stopped after'} {clock(now - self.start)}", now)


def advance(n: int) -> None:
    """n more units of the innermost open chunk are done (never past its end); no-op outside one."""
    if _open_chunks:
        progress, end = _open_chunks[-1]
        progress.update(max(0, min(int(n), end - progress.done)))


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False
