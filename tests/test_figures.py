"""tracking.figures: when a run's figures are drawn, and figures.npz holding exactly what they show."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from freqexp import plots
from freqexp.multirun import figures
from freqexp.errors import ConfigError
from tests.conftest import compose_cfg


def test_auto_is_all_in_a_run_and_best_in_a_sweep_and_a_bad_value_is_named():
    cfg = compose_cfg([])
    assert cfg.tracking.figures == "auto" and cfg.tracking.figures_best == 3
    assert figures.mode(cfg, multirun=False) == "all" and figures.mode(cfg, multirun=True) == "best"
    assert figures.mode(cfg) == "all"  # no Hydra run around: a single run
    for value in ("all", "best", "none"):
        assert figures.mode(compose_cfg([f"tracking.figures={value}"]), multirun=True) == value
    with pytest.raises(ConfigError, match=r"tracking.figures: no option 'bset'; did you mean best\?; options: auto, all, best, none"):
        figures.mode(compose_cfg(["tracking.figures=bset"]))
    with pytest.raises(ConfigError, match="tracking.figures_best: must be an integer >= 0"):
        figures.best_count(compose_cfg(["tracking.figures_best=-1"]))


def test_a_best_mode_run_saves_what_its_figures_show_and_they_draw_from_it(tmp_path, store):
    from freqexp.data import build_dataset
    from freqexp.run import execute

    cfg = compose_cfg(["dataset=synthetic", "model=cae", "trainer.max_epochs=1", "trainer.progress_bar=false", "tracking.figures=best",
                       f"tracking.uri={store}", "dataset.n_train=48", "dataset.n_val=16", "dataset.n_test=24"])
    result = execute(cfg, tmp_path / "run", run_name="run")
    out = tmp_path / "run"
    assert (out / "figures.npz").exists() and not list(out.glob("*.png"))  # nothing drawn yet
    assert "figures.npz" in {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}
    fd = figures.load(out / "figures.npz")
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose(fd["metrics"], [metrics["test/auroc"], metrics["test/ap"], metrics["val/threshold"]])

    data = build_dataset(cfg.dataset)  # the same split again (seeded), to check the picks independently
    labels = data.test.labels
    assert fd["labels"].tolist() == labels.tolist() and len(fd["scores"]) == len(labels)
    pick = [i for i in range(len(labels)) if labels[i] == 0][:8] + [i for i in range(len(labels)) if labels[i] == 1][:8]
    assert fd["grid_labels"].tolist() == labels[pick].tolist()
    np.testing.assert_allclose(fd["grid_scores"], fd["scores"][pick])
    images = data.test.images[pick].float()
    images = images / 255 if data.test.images.dtype == torch.uint8 else images
    assert fd["grid_inputs"].dtype == np.uint8  # 8 bits: what a figure can show
    np.testing.assert_array_equal(fd["grid_inputs"], (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    assert fd["grid_recons"].shape == fd["grid_inputs"].shape and fd["grid_maps"].shape[1] == 1
    idx = plots.overlay_indices(labels)
    assert fd["overlay_indices"].tolist() == idx.tolist()
    np.testing.assert_array_equal(fd["overlay_masks"], data.test.masks[idx].bool().numpy())
    vmin, vmax = fd["overlay_range"]
    assert vmin < vmax

    paths = figures.draw(fd, out)
    assert [p.name for p in paths] == ["reconstructions.png", "roc.png", "pr.png", "score_hist.png", "anomaly_overlays.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_single_run_draws_every_figure_and_none_draws_nothing(tmp_path, store):
    from freqexp.run import execute

    common = ["dataset=synthetic", "model=ae", "trainer.max_epochs=1", "trainer.progress_bar=false", f"tracking.uri={store}",
              "dataset.n_train=32", "dataset.n_val=16", "dataset.n_test=16"]
    execute(compose_cfg(common), tmp_path / "auto", run_name="auto")  # auto outside a sweep: all
    assert {p.name for p in (tmp_path / "auto").glob("*.png")} == {"reconstructions.png", "roc.png", "pr.png", "score_hist.png",
                                                                  "anomaly_overlays.png"}
    assert not (tmp_path / "auto" / "figures.npz").exists()
    execute(compose_cfg(common + ["tracking.figures=none"]), tmp_path / "none", run_name="none")
    assert not list((tmp_path / "none").glob("*.png")) and not (tmp_path / "none" / "figures.npz").exists()


def test_the_figures_command_refuses_what_it_cannot_draw_in_one_line(tmp_path, capsys, store):
    assert figures.main([str(tmp_path)]) == 2
    assert "holds no figures.npz" in capsys.readouterr().err
    MlflowClient(store).create_experiment("x")
    capsys.readouterr()  # (MLflow's own lines while creating the store)
    assert figures.main(["0123456789abcdef", "--uri", store]) == 2
    err = capsys.readouterr().err
    assert "is neither a run directory nor a run with figures.npz" in err and len(err.strip().splitlines()) == 1
    missing = tmp_path / "typo" / "mlflow.db"
    assert figures.main(["0123456789abcdef", "--uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not missing.parent.exists()  # nothing created


def test_maps_keep_their_detail_in_half_precision_or_stay_single():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(4, 1, 8, 8, generator=g) * 0.3
    offset = 1000 + 4 * torch.rand(4, 1, 8, 8, generator=g)  # float16 steps are 0.5 near 1000: 9 levels of 4
    assert figures._maps(small).dtype == np.float16
    np.testing.assert_allclose(figures._maps(small), small.numpy(), atol=0.3 / 1024)
    assert figures._maps(offset).dtype == np.float32 and figures._maps(torch.full((2, 1, 4, 4), 7e4)).dtype == np.float32


def _fake_figure_data(n=4, h=6, w=6):
    g = np.random.default_rng(0)
    return {"scores": g.random(10).astype(np.float32), "labels": np.array([0] * 5 + [1] * 5, dtype=np.int8),
            "metrics": np.array([0.8, 0.9, 0.5]), "grid_inputs": g.integers(0, 256, (n, 1, h, w), dtype=np.uint8),
            "grid_recons": g.integers(0, 256, (n, 1, h, w), dtype=np.uint8), "grid_maps": g.random((n, 1, h, w)).astype(np.float16),
            "grid_labels": np.array([0, 0, 1, 1], dtype=np.int8), "grid_scores": g.random(n).astype(np.float32)}


@pytest.mark.parametrize("direction, objective, best_first", [
    (None, "val/auroc", True), (None, "sys/peak_memory_mb", False), ("minimize", "val/auroc", False), (["maximize"], "val/ap", True)])
def test_a_sweep_draws_its_best_runs_including_those_finished_before_and_never_a_nan(tmp_path, store, direction, objective, best_first):
    from omegaconf import OmegaConf

    client = MlflowClient(store)
    exp = client.create_experiment("e")
    jobs = []
    for i, (status, value, has_npz, drawn) in enumerate([("finished", 0.7, True, False), ("skipped", 0.8, False, False),
                                                         ("finished", float("nan"), True, False), ("finished", 0.6, True, False),
                                                         ("skipped", 0.9, False, True)]):
        run_id = client.create_run(exp).info.run_id
        job_dir = tmp_path / str(i)
        job_dir.mkdir()
        npz = figures.save(_fake_figure_data(), tmp_path / f"f{i}.npz")
        if has_npz:
            (job_dir / figures.NPZ).write_bytes(npz.read_bytes())
        else:  # a run a previous sweep finished: its figures.npz is in MLflow only
            (tmp_path / "up").mkdir(exist_ok=True)
            (tmp_path / "up" / figures.NPZ).write_bytes(npz.read_bytes())
            client.log_artifact(run_id, str(tmp_path / "up" / figures.NPZ))
        if drawn:  # figures drawn before: left as they are
            (tmp_path / "up" / "reconstructions.png").write_bytes(b"png")
            client.log_artifact(run_id, str(tmp_path / "up" / "reconstructions.png"))
        jobs.append({"status": status, "objective": value, "run_id": run_id, "job_dir": str(job_dir)})
    sweeper = {} if direction is None else {"direction": direction}
    config = OmegaConf.create({"tracking": {"uri": store, "experiment": "e", "figures": "auto", "figures_best": 2},
                               "sweep": {"objective": objective}, "hydra": {"sweeper": sweeper}})
    drawn = figures.draw_best(config, jobs)
    # ranked (NaN left out): best first 0.9 (drawn before), 0.8, 0.7, 0.6; worst first 0.6, 0.7, 0.8, 0.9
    expected = ["1"] if best_first else ["3", "0"]
    assert [Path(d).name for d in drawn] == expected
    for d in expected:
        run_id = jobs[int(d)]["run_id"]
        assert {"reconstructions.png", "roc.png", "pr.png", "score_hist.png"} <= {a.path for a in client.list_artifacts(run_id)}
        assert (tmp_path / d / "roc.png").exists()
    assert not (tmp_path / "2" / "roc.png").exists()  # the NaN run is never "best"
