"""The speed benchmarks run on a CPU with a tiny budget and report figures that agree with each
other (a GPU is where they matter; scripts/gpu-check.sh runs them there)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(script, *args, timeout=300):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_throughput_proxy_reports_consistent_rates_and_ratios():
    out = bench("throughput.py", "--proxy", "--epochs", "2", "--repeats", "1", "--steps-per-call", "4")
    rows = {m[1].strip(): (float(m[2].replace(",", "")), float(m[3])) for m in
            re.finditer(r"^(.{48}):\s+([\d,]+) img/s\s+(\d+) us/step", out, re.M)}
    ours, grouped = "freqexp (Lightning), steps_per_call=auto -> 1", "freqexp (Lightning), steps_per_call=4"
    assert set(rows) == {"plain loop, torch's default AdamW", "plain loop, fused AdamW", ours, grouped}
    for ips, us in rows.values():  # 4096 images in 128 steps of 32 (grouped too): img/s x s/step = 32 images
        assert ips * us / 1e6 == pytest.approx(32, rel=0.01)
    fused, plain = rows["plain loop, fused AdamW"], rows["plain loop, torch's default AdamW"]
    for path in (ours, grouped):  # each path's own block of ratios, from its own row
        block = out[out.index(f"{path}:\n"):]
        assert float(re.search(r"same optimizer \(fused AdamW\): ([\d.]+)", block)[1]) == pytest.approx(rows[path][0] / fused[0], abs=2e-3)
        assert float(re.search(r"default AdamW\s+: ([\d.]+)", block)[1]) == pytest.approx(rows[path][0] / plain[0], abs=2e-3)
        overhead = float(re.search(r"same loop \(fused AdamW\): ([+-]\d+) us", block)[1])
        assert overhead == pytest.approx(rows[path][1] - fused[1], abs=1.5)


def test_run_breakdown_accounts_for_the_whole_wall_time():
    out = bench("run_breakdown.py", "--runs", "1", "--baseline-env", "FREQEXP_STORE_PROCESS=0", "dataset=synthetic", "trainer.max_epochs=1")
    rows = {m[1]: (float(m[2]), float(m[4])) for m in re.finditer(r"^(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}
    steps = {k: v for k, v in rows.items() if k != "wall"}
    assert {"store", "data", "fit", "evaluate", "exit"} <= set(steps) and len(steps) == 13
    for column in (0, 1):  # as is, and the baseline (the store opened in the run's own process)
        wall = rows["wall"][column]
        assert sum(v[column] for v in steps.values()) == pytest.approx(wall, rel=0.05)  # every second of the wall is in one step
    besides = float(re.search(r"besides the fit: ([\d.]+) s", out)[1])
    assert besides == pytest.approx(rows["wall"][0] - rows["fit"][0], abs=0.02)
    ratio = re.search(r"besides the fit ([\d.]+) s; ratio as is / baseline: wall ([\d.]+), besides the fit ([\d.]+)", out)
    assert float(ratio[1]) == pytest.approx(rows["wall"][1] - rows["fit"][1], abs=0.02)
    assert float(ratio[2]) == pytest.approx(rows["wall"][0] / rows["wall"][1], abs=2e-3)
    assert float(ratio[3]) == pytest.approx(besides / float(ratio[1]), abs=2e-3)


def test_import_time_compares_lightning_imported_both_ways_and_reports_its_own_ratio():
    out = bench("import_time.py", "--lightning", "1", "--lightning-only")
    rows = {m[1].strip(): (float(m[2]), m[3]) for m in
            re.finditer(r"^  (.{32}) +([\d.]+)   transformers imported: (yes|no) ", out, re.M)}
    ours, plain = rows["freqexp (lightning_import)"], rows["plain import lightning.pytorch"]
    assert (ours[1], plain[1]) == ("no", "yes")  # what freqexp saves is the import of transformers
    ratio = re.search(r"ratio freqexp / plain: ([\d.]+) \(([+-][\d.]+) s saved\)", out)
    assert float(ratio[1]) == pytest.approx(ours[0] / plain[0], abs=2e-3)
    assert float(ratio[2]) == pytest.approx(plain[0] - ours[0], abs=0.011)


def test_channels_last_benchmark_reports_ratios_of_its_own_rows():
    out = bench("channels_last.py", "--images", "64", "--steps", "2", "--repeats", "1", "dataset=synthetic", "trainer.batch_size=32",
                "trainer.eval_batch_size=32")
    rows = {m[1]: (float(m[2].replace(",", "")), float(m[3])) for m in
            re.finditer(r"^(NCHW|NHWC): scoring\s+([\d,]+) img/s .*?training\s+([\d.]+) ms/step", out, re.M)}
    assert set(rows) == {"NCHW", "NHWC"}
    ratio = re.search(r"ratio NHWC / NCHW: scoring ([\d.]+)x, training step ([\d.]+)x; largest image-score difference ([\d.e+-]+)", out)
    assert float(ratio[1]) == pytest.approx(rows["NHWC"][0] / rows["NCHW"][0], rel=0.02)
    assert float(ratio[2]) == pytest.approx(rows["NCHW"][1] / rows["NHWC"][1], rel=0.05)
    assert float(ratio[3]) < 1e-4  # the layout changes speed, not scores
    assert "hardware.channels_last=auto gives True" in out  # the CAE on a CPU


def test_search_width_benchmark_finds_the_same_rows_and_reports_its_own_ratios():
    out = bench("memory_bank_speed.py", "--search-widths", "64", "1024", "--search-rows", "40", "300", "--limit-train", "10",
                "--limit-test", "10", "++model.input_size=64", "++model.center_crop=null", "--threads", "2")
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\d+)\s+(yes|no)$", out, re.M)
    assert [(int(n), int(w)) for n, w, *_ in rows] == [(40, 64), (40, 1024), (300, 64), (300, 1024)]
    for _, _, fp32, pruned, ratio, _, same in rows:
        assert same == "yes"  # the pruned search found rows as near as the fp32 product's
        f, p, h = float(fp32), float(pruned), 5e-5  # the times as printed, to 4 decimals
        assert (f - h) / (p + h) - 0.005 <= float(ratio) <= (f + h) / (p - h) + 0.005


def test_epoch_logging_benchmark_stores_every_point_and_reports_its_own_difference(tmp_path):
    out = bench("epoch_logging.py", "--epochs", "4", "--repeats", "1", "--uri", f"sqlite:///{tmp_path / 'e.db'}")
    rows = {m[1].strip(): float(m[2]) for m in re.finditer(r"^(.{30}):\s+([\d.]+) ms/epoch", out, re.M)}
    assert set(rows) == {"written each epoch (2 writes)", "buffered (log_epoch_metrics)"}
    saved = re.search(r"saved per epoch: ([\d.-]+) ms; per run of 4 epochs: ([\d.-]+) s", out)
    assert float(saved[1]) == pytest.approx(rows["written each epoch (2 writes)"] - rows["buffered (log_epoch_metrics)"], abs=0.011)
    assert float(saved[2]) == pytest.approx(float(saved[1]) * 4 / 1000, abs=1e-3)
    from mlflow.tracking import MlflowClient  # both runs hold every epoch's points (the script asserts it too)

    client = MlflowClient(f"sqlite:///{tmp_path / 'e.db'}")
    exp = client.get_experiment_by_name("epoch-logging")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["buffered", "each-epoch"]
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_epoch/auroc")] == [1, 2, 3, 4]


def test_score_chunks_benchmark_scores_the_same_both_ways_and_reports_its_own_ratio():
    out = bench("score_chunks.py", "--models", "cae,ae", "--images", "300", "--repeats", "1",
                "dataset=synthetic", "dataset.image_size=28", "trainer.eval_batch_size=256")
    rows = {m[1]: m.groups()[1:] for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.e+-]+)$", out, re.M)}
    assert set(rows) == {"cae", "ae"}
    batch, chunk, whole, chunked, ratio, diff = rows["cae"]
    assert (int(batch), int(chunk)) == (256, 125)  # 12 MiB over the decoder's 32 x 28 x 28 fp32 output
    whole, chunked = (float(v.replace(",", "")) for v in (whole, chunked))
    assert float(ratio) == pytest.approx(chunked / whole, abs=0.006)
    assert float(diff) <= 1e-5
    assert int(rows["ae"][1]) == 256  # an MLP's outputs are small: its batches stay whole
