"""Progress of long steps: plain lines with a count, a share and the time left where output is
not a terminal; a bar on a terminal; nothing with progress off or for a short step."""
from __future__ import annotations

import io
import re
import time

import pytest
import torch

from freqexp import progress
from freqexp.progress import Progress, clock
from tests.conftest import compose_cfg

LINE = re.compile(r"^(?P<desc>[a-z ]+): (?P<done>[\d,]+)/(?P<total>[\d,]+)(?: (?P<unit>\w+))? \((?P<pct>\d+) %\), "
                  r"(?:(?P<left>\d+:\d\d(?::\d\d)?) left|(?:done in|stopped after) \d+:\d\d(?::\d\d)?)$")


def parse(text: str, desc: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m and m["desc"] == desc]


def count(m: re.Match, key: str) -> int:
    return int(m[key].replace(",", ""))


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_count_share_and_time_left_on_a_non_terminal_stream():
    out = io.StringIO()
    with progress.settings(delay=0, line_seconds=3600), Progress("coreset selection", 23_520, "rows", stream=out) as p:
        for _ in range(8):
            time.sleep(0.01)
            p.update(2_940)  # 1/8 of the work per chunk
    lines = parse(out.getvalue(), "coreset selection")
    assert len(lines) == 8 and out.getvalue().count("\n") == 8  # 7 lines with the time left, then the last one
    assert [count(m, "done") for m in lines] == [2_940 * i for i in range(1, 9)]
    assert all(m["total"] == "23,520" and m["unit"] == "rows" for m in lines)
    assert [int(m["pct"]) for m in lines] == [100 * 2_940 * i // 23_520 for i in range(1, 9)]
    assert all(m["left"] for m in lines[:-1]) and "done in" in lines[-1][0]
    assert lines[0][0].startswith("coreset selection: 2,940/23,520 rows (12 %), ")


def test_time_left_is_the_elapsed_rate_times_the_work_remaining(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    out = io.StringIO()
    with progress.settings(delay=0), Progress("scoring test", 1000, "images", stream=out) as p:
        now[0] += 30.0
        p.update(250)  # 30 s for a quarter: 90 s left
        now[0] += 45.0
        p.update(500)  # 75 s for three quarters: 25 s left
        now[0] += 25.0
        p.update(250)
    assert out.getvalue().splitlines() == ["scoring test: 250/1,000 images (25 %), 1:30 left",
                                          "scoring test: 750/1,000 images (75 %), 0:25 left",
                                          "scoring test: 1,000/1,000 images (100 %), done in 1:40"]


def test_lines_come_at_each_tenth_and_at_least_every_line_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    out = io.StringIO()
    with progress.settings(delay=0, line_seconds=30), Progress("feature extraction", 10_000, "images", stream=out) as p:
        for _ in range(100):  # 1 % a step, one second each
            now[0] += 1.0
            p.update(100)
    done = [count(m, "done") for m in parse(out.getvalue(), "feature extraction")]
    assert done == [1_000 * i for i in range(1, 11)]  # each tenth; 10 s apart, under 30 s
    out = io.StringIO()
    now[0] = 0.0
    with progress.settings(delay=0, line_seconds=30), Progress("feature extraction", 10_000, "images", stream=out) as p:
        for _ in range(100):  # 0.1 % a step, one second each: a tenth takes 100 s
            now[0] += 1.0
            p.update(10)
    lines = parse(out.getvalue(), "feature extraction")
    assert [count(m, "done") for m in lines] == [300, 600, 900, 1_000, 1_000]  # 30 s apart, then the first tenth
    assert lines[-1][0].endswith("stopped after 1:40")  # closed before the end


def test_short_steps_and_progress_off_print_nothing(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    out = io.StringIO()
    with progress.settings(delay=2.0), Progress("scoring val", 100, "images", stream=out) as p:
        for _ in range(10):
            now[0] += 0.1  # all done in 1 s
            p.update(10)
    assert out.getvalue() == ""
    with progress.settings(enabled=False, delay=0), Progress("scoring val", 100, "images", stream=out) as p:
        for _ in range(10):
            now[0] += 10.0
            p.update(10)
    assert out.getvalue() == ""


def test_chunks_take_the_advances_of_the_code_within_and_count_once():
    out = io.StringIO()
    progress.advance(5)  # outside any chunk: nothing to move
    with progress.settings(delay=0, line_seconds=3600), Progress("scoring test", 40, "images", stream=out) as p:
        with p.chunk(16):  # a batch of 16 scored in micro-batches of 6, 6, 4
            for part in (6, 6, 4):
                progress.advance(part)
            progress.advance(3)  # past the chunk's end: not counted
            assert p.done == 16
        assert p.done == 16
        with p.chunk(16):  # a model that reports nothing: the whole chunk when it returns
            assert p.done == 16
        assert p.done == 32
        with pytest.raises(RuntimeError), p.chunk(8):
            progress.advance(2)
            raise RuntimeError("a failed batch")
        assert p.done == 34  # only what was reported before the failure
    lines = parse(out.getvalue(), "scoring test")
    assert [count(m, "done") for m in lines] == [6, 12, 16, 32, 34]
    assert lines[-1][0].startswith("scoring test: 34/40 images (85 %), stopped after ")


def test_a_terminal_gets_a_bar_that_is_removed_at_the_end():
    out = Tty()
    with progress.settings(delay=0), Progress("coreset selection", 50, "rows", stream=out) as p:
        for _ in range(5):
            p.update(10)
        assert p.bar is not None and p.bar.n == 50
    text = out.getvalue()
    assert "coreset selection" in text and "/50" in text and "\r" in text
    assert not parse(text.replace("\r", "\n"), "coreset selection")  # no plain lines


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (42.4, "0:42"), (725, "12:05"), (3723, "1:02:03")])
def test_clock(seconds, text):
    assert clock(seconds) == text


@pytest.mark.parametrize("sampler", ["greedy", "approximate"])
def test_coreset_selection_reports_per_block_of_steps(capsys, sampler):
    from freqexp.models.coreset import PROGRESS_STEPS, approximate_greedy_coreset, greedy_coreset

    feats = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    k = 3 * PROGRESS_STEPS + 10

    def select():
        if sampler == "greedy":
            return greedy_coreset(feats, k)
        return approximate_greedy_coreset(feats, k, torch.Generator().manual_seed(1))

    with progress.settings(delay=0, line_seconds=3600):
        chosen = select()
    lines = parse(capsys.readouterr().err, "coreset selection")
    assert [count(m, "done") for m in lines] == [PROGRESS_STEPS, 2 * PROGRESS_STEPS, 3 * PROGRESS_STEPS, k]
    assert all(count(m, "total") == k for m in lines) and all(m["left"] for m in lines[:-1])
    with progress.settings(enabled=False, delay=0):
        assert torch.equal(select(), chosen)  # progress changes nothing chosen
    assert capsys.readouterr().err == ""


def small_patchcore_run(tmp_path, progress_bar: bool):
    from freqexp.run import execute

    cfg = compose_cfg(["model=patchcore", "model.backbone.arch=resnet18", "model.input_size=null", "model.center_crop=null",
                       "model.feature_dim=16", "model.pretrain_dim=16", "model.sampling_ratio=0.5", "dataset=synthetic",
                       "dataset.n_train=96", "dataset.n_val=64", "dataset.n_test=64", "hardware=cpu", f"trainer.progress_bar={str(progress_bar).lower()}", "tracking.figures=none",
                       "trainer.fit_on=train",  # keep a validation split, so that its scoring reports too
                       f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with progress.settings(delay=0, line_seconds=3600):  # show even these short steps
        return execute(cfg, tmp_path / "run")


def test_a_memory_bank_run_reports_its_long_steps_in_plain_lines(tmp_path, capfd):
    # the default batches (256 to train, 1024 to score) hold every image of these splits at once:
    # the lines come from the model's micro-batches (16 images on a CPU)
    small_patchcore_run(tmp_path, progress_bar=True)
    out, err = capfd.readouterr()
    steps = {desc: parse(err, desc) for desc in ("feature extraction", "coreset selection", "validation", "scoring val", "scoring test")}
    for desc, lines in steps.items():
        assert len(lines) >= 3, (desc, err)
        assert all(m["left"] for m in lines[:-1]) and "done in" in lines[-1][0], desc
        totals = {count(m, "total") for m in lines}
        assert len(totals) == 1 and count(lines[-1], "done") == totals.pop(), desc
    assert steps["feature extraction"][0]["unit"] == "images"
    assert count(steps["scoring test"][-1], "total") == 64 and count(steps["scoring val"][-1], "total") == count(steps["validation"][-1], "total")
    patches = count(steps["feature extraction"][-1], "total") * 16  # a 4 x 4 grid of layer2 at 32 px
    assert count(steps["coreset selection"][-1], "total") == patches // 2
    assert "\r" not in err  # no bar redraws where output is not a terminal


def test_a_run_with_progress_bar_false_prints_no_progress(tmp_path, capfd):
    small_patchcore_run(tmp_path, progress_bar=False)
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if LINE.match(line)], out + err
    assert " left" not in out + err


def test_cuda_graph_replays_are_followed_by_their_events_without_waiting_on_the_device(monkeypatch):
    # the coreset's CUDA-graph path records an event after each replay of GRAPH_BLOCK steps and
    # reports the replays whose events have completed (Event.query: no synchronisation)
    from freqexp.models import coreset

    class Event:
        def __init__(self, ready_at):
            self.ready_at = ready_at

        def query(self):
            return clock_now[0] >= self.ready_at

    clock_now = [0.0]
    monkeypatch.setattr(coreset.time, "sleep", lambda s: clock_now.__setitem__(0, clock_now[0] + 1))
    monkeypatch.setattr(progress, "_now", lambda: clock_now[0])
    k = 5 * coreset.GRAPH_BLOCK - 100
    events = [Event(ready_at=i + 1) for i in range(5)]  # replay i finishes at t = i + 1
    out = io.StringIO()
    with progress.settings(delay=0, line_seconds=3600), Progress("coreset selection", k, "rows", stream=out) as p:
        coreset._follow_events(events, p, coreset.GRAPH_WARMUP, k)
        assert p.done == k
    done = [count(m, "done") for m in parse(out.getvalue(), "coreset selection")]
    assert done == [coreset.GRAPH_WARMUP + i * coreset.GRAPH_BLOCK for i in range(1, 5)] + [k]
