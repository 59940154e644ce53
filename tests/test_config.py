"""Every group option composes and validates; --help shows the groups; bad values fail in
one line naming the key, before any MLflow run exists."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from freqexp.errors import ConfigError
from freqexp.losses.terms import LOSS_TERMS
from freqexp.validate import make_plan, resolve_hardware
from tests.conftest import REPO, cli, compose_cfg, read_runs

GROUPS = ["model", "filter", "augment", "dataset", "hardware", "trainer", "tracking"]


def options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"] + (["dataset=synthetic"] if group != "dataset" else [])
    if option == "mnist_idx":  # needs a folder of IDX files
        from tests.test_mnist_idx import write_set

        overrides.append(f"dataset.root={write_set(tmp_path)}")
    if option == "mvtec":  # needs a folder in MVTec's layout
        from tests.test_image_datasets import make_mvtec

        overrides += [f"dataset.root={make_mvtec(tmp_path)}", "dataset.category=widget", "dataset.image_size=32"]
    if option in ("visa", "btad", "mpdd"):  # need a folder in their layouts
        from tests.test_zero_shot_data import config_overrides

        overrides = config_overrides(option, tmp_path)
    if option == "folder":  # needs folders of normal and anomalous images
        from tests.test_image_datasets import make_folders

        root = make_folders(tmp_path)
        overrides += [f"dataset.normal_dir={root / 'normal'}", f"dataset.abnormal_dir={root / 'abnormal'}", "dataset.image_size=32"]
    if option == "tiff_domains":  # needs TIFF files in domain folders
        from tests.test_tiff_domains import write_domain

        write_domain(tmp_path / "tiffs", "domain_A")
        overrides += [f"dataset.root={tmp_path / 'tiffs'}", "dataset.domain=domain_A"]
    model_cls = None
    if group == "model":  # what the model needs from the rest of the config (see test_model_zoo)
        from tests.test_model_zoo import overrides_for

        overrides = [o for o in overrides_for(option, tmp_path) if not o.startswith("tracking.")]
        from freqexp.models import model_class

        model_cls = model_class(compose_cfg(overrides).model.name)
    cfg = compose_cfg(overrides)
    assert cfg[group] is not None
    if group == "hardware" and option == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            make_plan(cfg)
        return
    plan = make_plan(cfg)
    if model_cls is not None and (model_cls.gradient_free or model_cls.lightning_module != "freqexp.training:ReconstructionModule"):
        return  # own procedures need a Trainer: tests/test_model_zoo.py fits every model option
    # one real training step through the shared LightningModule, and scoring
    from freqexp.training import ReconstructionModule

    module = ReconstructionModule.from_plan(plan, cfg, max_epochs=1)
    x = torch.rand(4, *plan.shape)
    loss = module.training_step(x, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in plan.model.parameters() if p.grad is not None)
    assert module.anomaly_map(x).shape == (4, 1, *plan.shape[1:])


def test_default_config_is_the_card():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.loss.spec, cfg.filter.name, cfg.augment.name, cfg.dataset.name) == (
        "cae", "mse+ssim", "none", "none", "fashion_mnist")
    assert cfg.dataset.normal_class == 0
    assert cfg.tracking.uri == "sqlite:///outputs/mlflow.db"


@pytest.mark.parametrize("spec", ["mse", "ssim+mse", "tv+gradient+charbonnier+l1", "mse+l1+charbonnier+ssim+gradient+tv"])
def test_any_loss_combination_composes_with_weights_and_params(spec):
    cfg = compose_cfg(["dataset=synthetic", f"loss={spec}"])
    terms = spec.split("+")
    assert cfg.loss.spec == spec
    assert sorted(cfg.loss.weights) == sorted(terms)
    plan = make_plan(cfg)
    assert list(plan.loss.terms) == terms


def test_loss_weights_and_params_override_from_command_line():
    cfg = compose_cfg(["dataset=synthetic", "loss=mse+ssim", "loss.weights.ssim=0.25", "loss.params.ssim.win_size=5"])
    plan = make_plan(cfg)
    assert plan.loss.weights == {"mse": 1.0, "ssim": 0.25}
    assert plan.loss.terms["ssim"].win_size == 5


def test_unknown_loss_term_composes_but_fails_validation_listing_known_terms():
    cfg = compose_cfg(["loss=mse+foo"])  # a sweep must be able to compose it
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == "loss"
    for name in LOSS_TERMS.names():
        assert name in str(e.value)


def test_hardware_auto_resolves_to_cpu_fp32_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hw = resolve_hardware(compose_cfg(["hardware=auto"]).hardware)
    assert (hw.accelerator, hw.precision, hw.device.type) == ("cpu", "32-true", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hw = resolve_hardware(compose_cfg(["hardware=auto"]).hardware)
    assert (hw.accelerator, hw.precision) == ("gpu", "16-mixed")


def test_cpu_rejects_fp16_mixed():
    with pytest.raises(ConfigError, match="16-mixed needs a GPU") as e:
        resolve_hardware(compose_cfg(["hardware=cpu", "hardware.precision=16-mixed"]).hardware)
    assert e.value.key == "hardware.precision"


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.name=lbfgs", "optim.name"),
        ("optim.scheduler=step", "optim.scheduler"),
        ("score.reduction=median", "score.reduction"),
        ("score.topk=1.5", "score.topk"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("model.latent_dim=0", "model.latent_dim"),
        ("filter.apply_to=output", "filter.apply_to"),
        ("augment=noise", None),
        ("dataset.n_train=0", "dataset.n_train"),
        ("loss.weights.mse=-1", "loss.weights.mse"),
        ("hardware.precision=bf16-true", "hardware.precision"),
        ("trainer.restore_best=no", "trainer.restore_best"),
        ("trainer.early_stopping.enabled=maybe", "trainer.early_stopping.enabled"),
        ("trainer.val_every_n_epochs=3", "trainer.val_every_n_epochs"),  # does not divide max_epochs=20
        ("trainer.steps_per_call=0", "trainer.steps_per_call"),
        ("trainer.steps_per_call=many", "trainer.steps_per_call"),
        ("trainer.steps_per_call=8", None),
        ("loss.params.ssim.sigma=abc", "loss.params.ssim.sigma"),
        ("tracking.experiment=''", "tracking.experiment"),
        ("sweep.objective=test/auroc", "sweep.objective"),
        ("sweep.objective=val/nope", "sweep.objective"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(override, key):
    cfg = compose_cfg(["dataset=synthetic", override])
    if key is None:  # control: a valid override
        make_plan(cfg)
        return
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == key


@pytest.mark.parametrize("override", ["dataset.val_fraction=abc", "dataset.val_anomaly_ratio=abc", "dataset.normal_class=[]"])
def test_fashion_mnist_type_errors_name_the_key(override):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == override.split("=")[0]


def test_help_lists_groups_and_their_options(tmp_path):
    r = cli(["--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for group in GROUPS + ["loss"]:
        assert f"{group}:" in out
    for group in ["model", "filter", "augment", "dataset", "hardware"]:  # every yaml of the group, from conf/
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert f"{group}: " + ", ".join(options) + "\n" in out
    for term in LOSS_TERMS.names():
        assert term in out
    from freqexp.conf_source import sweep_presets

    presets = sweep_presets()
    assert {"loss_model_grid", "filter_grid", "fair_ablation", "seeds", "optuna", "optuna_multi"} <= set(presets)
    assert "sweep presets (python -m freqexp -m +sweep=NAME): " + ", ".join(presets) in out
    assert "--multirun" in out


@pytest.mark.parametrize(
    "args,key",
    [
        (["dataset.normal_class=12"], "dataset.normal_class"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs"),
        (["loss=mse+foo"], "loss"),
        (["dataset=synthetic", "dataset.image_size=6", "loss=mse+ssim"], "loss"),
        (["hardware=cpu", "hardware.precision=16-mixed"], "hardware.precision"),
        (["tracking.uri=./mlruns"], "tracking.uri"),
        (["tracking.uri=postgresql://u@127.0.0.1:1/x"], "tracking.uri"),
        (["tracking.uri=http://127.0.0.1:1"], "tracking.uri"),
    ],
)
def test_cli_bad_input_is_one_line_no_traceback_no_run(tmp_path, args, key):
    db = tmp_path / "bad.db"
    r = cli(args + [f"tracking.uri=sqlite:///{db}"] if "tracking.uri" not in key else args, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"freqexp: error: {key}:"), r.stderr
    if key == "dataset.normal_class":
        assert "0-9" in err[0]
    if key == "loss" and "foo" in args[0]:
        assert "known terms: " + ", ".join(LOSS_TERMS.names()) in err[0]
    if key == "loss" and "ssim" in args[-1]:
        assert "7x7" in err[0] and "6x6" in err[0]
    # nothing was opened: no store at all, or one without runs
    assert not db.exists() or len(read_runs(f"sqlite:///{db}")) == 0
    assert not list(Path(tmp_path).glob("outputs/**/metrics.json"))


def test_unknown_group_option_is_one_line_with_a_did_you_mean(tmp_path):
    r = cli(["model=CAE"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("freqexp: error: model: no option 'CAE'; did you mean cae"), r.stderr
    assert "options: " + ", ".join(sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))) in err[0]


@pytest.mark.parametrize("args,start,hint", [
    (["filter=bhfp"], "filter: no option 'bhfp'", "did you mean bhpf"),
    (["loss=mse+sssim"], "loss: unknown loss term 'sssim'", "did you mean ssim"),
    (["+sweep=optuan"], "sweep: no preset 'optuan'", "did you mean optuna"),
    (["trainer.epochs=3"], "trainer.epochs: no such key", "did you mean trainer.max_epochs"),
    (["epochs=3"], "epochs: no such key", "did you mean trainer.max_epochs"),
    (["+trainer.epochs=3"], "trainer.epochs: no component reads it", "did you mean trainer.max_epochs"),
    (["model=draem", "+dataset.splitseed=3"], "dataset.splitseed: no component reads it", "did you mean dataset.split_seed"),
    (["-m", "model=cae,patchcore", "model.center_crop=0.5"], None, None),  # patchcore has it: known in a sweep
    (["model=cae", "++model.whatever=1"], None, None),  # ++ is left to the user (and to the model's own check)
    (["model=cae", "loss.weights.mse=2", "filter=fair", "filter.unit=px", "filter.cutoff=30"], None, None),
    (["-m", "loss=mse,mse+nosuchterm"], None, None),  # a swept loss: the bad job fails alone, the sweep goes on
])
def test_overrides_are_checked_before_composing(args, start, hint):
    from freqexp.overrides import check

    problem = check(args)
    if start is None:
        assert problem is None
    else:
        assert problem.startswith(start) and hint in problem and "\n" not in problem, problem
