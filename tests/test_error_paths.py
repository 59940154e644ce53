"""Every bad-input path that docs/running.md and docs/sweeps.md document, as a new user meets it:
a non-zero exit with one short line that names the key or the file, no traceback, and no MLflow
run left open (none is opened at all). Most paths are checked in process, at the step that
catches them (the command line's overrides, the run's validation, the data read after the store
opens); a few go through `python -m freqexp` end to end, since that is where a traceback or a
second line would show."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import tifffile

import freqexp.data.fashion_mnist as fm
from freqexp.errors import ConfigError, FreqexpError
from freqexp.overrides import check
from freqexp.run import execute, one_line
from freqexp.tracking import Tracker, check_uri, resolve_uri
from freqexp.validate import make_plan
from tests.conftest import FAST, cli, compose_cfg, read_runs
from tests.test_image_datasets import make_folders, make_mvtec, save
from tests.test_tiff_domains import write_bad, write_domain

SHORT = 400  # characters: one terminal line or two, never MLflow's screenful


def assert_one_short_line(text: str, *names: str) -> None:
    assert "\n" not in text and "Traceback" not in text and len(text) <= SHORT, text
    for name in names:
        assert name in text, (name, text)


# -- typos: the command line's overrides, before anything is composed -------------------------

@pytest.mark.parametrize("args,start", [
    (["model=CAE"], "model: no option 'CAE'; did you mean cae"),
    (["loss=mse+sssim"], "loss: unknown loss term 'sssim' in 'mse+sssim'; did you mean ssim"),
    (["trainer.epochs=3"], "trainer.epochs: no such key; did you mean trainer.max_epochs"),
    (["+trainer.epochs=3"], "trainer.epochs: no component reads it"),
    (["-m", "+sweep=optuan"], "sweep: no preset 'optuan'; did you mean optuna"),
    (["tracking.uri=notascheme://x"], "tracking.uri: 'notascheme://x': unknown scheme 'notascheme'; use sqlite:///"),
    (["-m", "tracking.uri=sqlite:///a.db,notascheme://x"], "tracking.uri: 'notascheme://x': unknown scheme"),
    (["tracking.uri=./mlruns"], "tracking.uri: './mlruns' is a file path"),
])
def test_typos_are_one_line_before_composing(args, start):
    problem = check(args)
    assert problem is not None and problem.startswith(start), problem
    assert_one_short_line(problem)


def test_good_uris_and_interpolations_pass_the_override_check():
    for uri in ("sqlite:///outputs/mlflow.db", "sqlite:////tmp/x.db", "http://127.0.0.1:5000", "https://mlflow.example.org",
                "postgresql://u@db/mlflow", "postgresql+psycopg2://u@db/mlflow", "mysql://u@db/m", "mssql+pyodbc://u@db/m",
                "databricks", "databricks://profile", "${oc.env:MLFLOW_TRACKING_URI,sqlite:///outputs/mlflow.db}"):
        assert check([f"tracking.uri={uri}"]) is None, uri


# -- values: the run's validation, before data is read or a store opened ------------------------

@pytest.mark.parametrize("overrides,key,names", [
    (["dataset.normal_class=12"], "dataset.normal_class", ["0-9", "12"]),
    (["dataset=synthetic", "dataset.image_size=6"], "loss", ["7x7", "6x6"]),
    (["dataset=synthetic", "sweep.objective=test/auroc"], "sweep.objective", ["test metric"]),
    (["dataset=synthetic", "sweep.objective=val/nope"], "sweep.objective", ["val/nope", "val/auroc"]),
    (["dataset=synthetic", "hardware=cpu", "hardware.precision=16-mixed"], "hardware.precision", ["GPU"]),
    (["dataset=synthetic", "tracking.uri=notascheme://x"], "tracking.uri", ["notascheme", "sqlite:///PATH.db", "http(s)://"]),
    (["dataset=synthetic", "tracking.uri=file:///tmp/mlruns"], "tracking.uri", ["file:///tmp/mlruns", "mlflow 3"]),
    (["dataset=synthetic", "tracking.uri=sqlite://x.db"], "tracking.uri", ["sqlite:///"]),
    (["dataset=synthetic", "tracking.uri=http://"], "tracking.uri", ["no host"]),
    (["dataset=synthetic", "tracking.uri=http://127.0.0.1:1"], "tracking.uri", ["cannot reach http server at 127.0.0.1:1"]),
    (["dataset=synthetic", "tracking.uri=postgresql://u@127.0.0.1:1/x"], "tracking.uri", ["cannot reach postgresql"]),
    (["dataset=synthetic", "tracking.uri=sqlite:////proc/no/such/dir/m.db"], "tracking.uri", ["cannot create /proc/no/such/dir"]),
    (["dataset=synthetic", "tracking.experiment=''"], "tracking.experiment", []),
])
def test_bad_values_fail_validation_in_one_line(overrides, key, names):
    with pytest.raises(ConfigError) as e:
        make_plan(compose_cfg(overrides))
    assert e.value.key == key
    assert_one_short_line(str(e.value), f"{key}:", *names)


def test_sweep_settings_that_would_fail_every_job_are_one_line():
    """docs/sweeps.md: a pruner on a grid or a single run, or on a multi-objective search, and a
    study database that does not answer stop the sweep before any job (freqexp.multirun.sweep checks them
    with these functions when the sweep starts)."""
    from freqexp.multirun import pruning
    from freqexp.tracking import check_reachable

    with pytest.raises(ConfigError) as e:
        pruning.check(compose_cfg(["dataset=synthetic", "sweep.pruner.name=median"]), optuna_sweep=False)
    assert_one_short_line(str(e.value), "sweep.pruner.name:", "+sweep=optuna")
    with pytest.raises(ConfigError) as e:
        pruning.check(compose_cfg(["dataset=synthetic", "sweep.pruner.name=median", "sweep.objective=[val/auroc,val/throughput]"]),
                      optuna_sweep=True)
    assert_one_short_line(str(e.value), "sweep.pruner.name:", "multi-objective")
    with pytest.raises(ConfigError) as e:
        check_reachable("postgresql://u@127.0.0.1:1/optuna", "hydra.sweeper.storage")
    assert_one_short_line(str(e.value), "hydra.sweeper.storage:", "127.0.0.1:1")


def test_check_uri_accepts_what_mlflow_takes_and_names_the_key():
    assert check_uri("sqlite:///:memory:") == "sqlite"
    assert check_uri("postgresql+psycopg2://u@h/db") == "postgresql"
    assert check_uri("databricks") == "databricks"
    for bad in ("notascheme://x", "./mlruns", "file:///x", "sqlite://x.db", "sqlite:///", "http://", "", None, 3, "databricks-uc://x"):
        with pytest.raises(ConfigError) as e:
            check_uri(bad, "tracking.uri")
        assert e.value.key == "tracking.uri"
        assert_one_short_line(str(e.value), "tracking.uri:")


def test_a_sqlite_folder_or_a_file_that_is_no_database_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_uri(f"sqlite:///{tmp_path}")
    garbage = tmp_path / "notes.db"
    garbage.write_text("not a database")
    with pytest.raises(ConfigError) as e:
        Tracker(f"sqlite:///{garbage}", "x")
    assert_one_short_line(str(e.value), "tracking.uri:", str(garbage), "not a database")


# -- data: read after validation, before any MLflow run -----------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small copy of every bad data set the docs describe (MVTec layout, folders, TIFF domains,
    IDX files)."""
    root = tmp_path_factory.mktemp("data")
    make_mvtec(root / "mv_ok", category="bottle")
    make_mvtec(root / "mv_ok", category="cable")
    for name in ("mv_nomask", "mv_orphan", "mv_truncated", "mv_mixed"):
        make_mvtec(root / name, defects={"crack": 2})
    (root / "mv_nomask/widget/ground_truth/crack/001_mask.png").unlink()
    (root / "mv_orphan/widget/test/crack/000.png").unlink()
    victim = root / "mv_truncated/widget/test/good/002.png"
    victim.write_bytes(victim.read_bytes()[:200])
    save(root / "mv_mixed/widget/test/good/003.png", np.zeros((50, 40), np.uint8))
    for name in ("f_ok", "f_garbage", "f_mixed"):
        make_folders(root / name)
    (root / "f_empty").mkdir()
    (root / "f_garbage/abnormal/a002.png").write_bytes(b"garbage")
    save(root / "f_mixed/normal/n003.png", np.zeros((20, 30), np.uint8))
    write_domain(root / "t_ok", "domain_A")
    write_domain(root / "t_ok", "domain_B")
    for kind in ("truncated", "complex", "multi-page", "rgb", "nan"):
        write_domain(root / f"t_{kind}", "domain_A")
        write_bad(root / f"t_{kind}/domain_A/train/good/003.tif", kind)
    write_domain(root / "t_emptyclass", "domain_A", counts={"train/good": 4, "test/good": 2})
    (root / "t_emptyclass/domain_A/test/fault").mkdir()
    write_domain(root / "t_mixed", "domain_A")
    tifffile.imwrite(root / "t_mixed/domain_A/test/good/001.tif", np.zeros((20, 20), np.float32))
    (root / "fm_corrupt").mkdir()
    for stem, _, _ in fm.FILES.values():  # all four present, none of them Fashion-MNIST
        (root / "fm_corrupt" / f"{stem}.gz").write_bytes(gzip.compress(b"\0" * 64))
    (root / "idx_empty").mkdir()
    return root


def mvtec(name, *extra):
    return ["dataset=mvtec", f"dataset.root={{d}}/{name}", "dataset.category=widget", "dataset.image_size=null", *extra]


def folder(name):
    return ["dataset=folder", f"dataset.normal_dir={{d}}/{name}/normal", f"dataset.abnormal_dir={{d}}/{name}/abnormal",
            "dataset.image_size=null"]


def tiff(name, *extra):
    return ["dataset=tiff_domains", f"dataset.root={{d}}/{name}", "dataset.domain=domain_A", *extra]


# (overrides with {d} for the data folder, what the line must name)
DATA_PATHS = {
    "mvtec category=all": (["dataset=mvtec", "dataset.root={d}/mv_ok", "dataset.category=all"],
                           ["dataset.category:", "--multirun", "dataset.category=bottle,cable"]),
    "mvtec unknown category": (["dataset=mvtec", "dataset.root={d}/mv_ok", "dataset.category=screw"], ["dataset.category:", "bottle, cable"]),
    "mvtec defect without mask": (mvtec("mv_nomask"), ["test/crack/001.png", "no mask"]),
    "mvtec mask without image": (mvtec("mv_orphan"), ["000_mask.png", "mask with no image"]),
    "mvtec truncated image": (mvtec("mv_truncated"), ["test/good/002.png", "truncated"]),
    "mvtec mixed sizes": (mvtec("mv_mixed"), ["003.png is 50x40", "dataset.image_size"]),
    "folder missing": (["dataset=folder", "dataset.normal_dir={d}/nowhere", "dataset.abnormal_dir={d}/f_ok/abnormal"],
                       ["dataset.normal_dir:", "nowhere"]),
    "folder empty": (["dataset=folder", "dataset.normal_dir={d}/f_empty", "dataset.abnormal_dir={d}/f_ok/abnormal"],
                     ["f_empty", "no images with extensions", "dataset.normal_dir"]),
    "folder unreadable file": (folder("f_garbage"), ["abnormal/a002.png", "cannot be read as an image"]),
    "folder mixed sizes": (folder("f_mixed"), ["n003.png is 20x30", "dataset.image_size"]),
    "tiff unknown domain": (["dataset=tiff_domains", "dataset.root={d}/t_ok", "dataset.domain=domain_Z"],
                            ["dataset.domain:", "domain_A, domain_B"]),
    "tiff out of range with normalize=none": (tiff("t_ok", "dataset.normalize=none"), ["domain_A/train/good/", "outside [0, 1]"]),
    "tiff truncated": (tiff("t_truncated"), ["003.tif", "cannot be read as a TIFF"]),
    "tiff complex": (tiff("t_complex"), ["003.tif", "complex64"]),
    "tiff multi-page": (tiff("t_multi-page"), ["003.tif", "2 pages"]),
    "tiff rgb": (tiff("t_rgb"), ["003.tif", "3 samples per pixel"]),
    "tiff nan": (tiff("t_nan"), ["003.tif", "NaN"]),
    "tiff empty class folder": (tiff("t_emptyclass"), ["domain_A/test/fault", "holds no .tif"]),
    "tiff mixed sizes": (tiff("t_mixed"), ["001.tif is 20x20", "dataset.image_size"]),
    "fashion_mnist corrupt copy": (["dataset.root={d}/fm_corrupt"], ["fm_corrupt", "corrupt", "dataset-fashion-mnist", "dataset.root"]),
    "mnist_idx without its files": (["dataset=mnist_idx", "dataset.root={d}/idx_empty"], ["dataset.root:", "idx_empty"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for every data path (opening a new sqlite store costs a second of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("case", list(DATA_PATHS))
def test_bad_data_is_one_line_naming_the_file_and_opens_no_run(case, data, store, tmp_path):
    overrides, names = DATA_PATHS[case]
    cfg = compose_cfg([o.format(d=data) for o in overrides] + FAST + [f"tracking.uri={store}", "model=cae", "loss=mse"])
    with pytest.raises(FreqexpError) as e:
        execute(cfg, tmp_path / "run")  # what `python -m freqexp` runs: validation, store, data, then the run
    line = one_line(e.value)  # what the entry point prints after "freqexp: error: "
    assert line == str(e.value), "a multi-line message"
    assert_one_short_line(line, *[n.format(d=data) for n in names])
    assert len(read_runs(store)) == 0  # no run was opened, so none is left RUNNING


def test_fashion_mnist_missing_everywhere_names_the_package_and_the_key(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "SYSTEM_ROOT", str(tmp_path / "no-system-copy"))
    monkeypatch.chdir(tmp_path)
    from freqexp.data import build_dataset

    with pytest.raises(FreqexpError) as e:
        build_dataset(compose_cfg([]).dataset)
    assert_one_short_line(str(e.value), "apt-get install -y dataset-fashion-mnist", "dataset.root=DIR")


# -- end to end: what the terminal shows ---------------------------------------------------------

def assert_cli_one_line(r, *names: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("freqexp: error: "), r.stderr
    assert_one_short_line(lines[0], *names)
    return lines[0]


def test_cli_unknown_uri_scheme_is_one_line_naming_tracking_uri(tmp_path):
    """Issue 20: MLflow's 430-character UnsupportedModelRegistryStoreURIException, before."""
    for args in (["tracking.uri=notascheme://x"], ["-m", "model=ae,cae", "tracking.uri=notascheme://x"]):
        r = cli(args + ["dataset=synthetic"], cwd=tmp_path, timeout=120)
        assert_cli_one_line(r, "tracking.uri:", "notascheme://x", "sqlite:///PATH.db", "postgresql://", "databricks")
    assert not (tmp_path / "outputs").exists()  # nothing created, no store


def test_cli_bad_data_is_one_line_and_leaves_no_run(tmp_path):
    make_mvtec(tmp_path / "set", defects={"crack": 2})
    (tmp_path / "set/widget/ground_truth/crack/001_mask.png").unlink()
    db = tmp_path / "m.db"
    r = cli(["dataset=mvtec", f"dataset.root={tmp_path / 'set'}", "dataset.category=widget", f"tracking.uri=sqlite:///{db}", *FAST],
            cwd=tmp_path, timeout=180)
    assert_cli_one_line(r, "test/crack/001.png", "no mask")
    assert not db.exists() or len(read_runs(f"sqlite:///{db}")) == 0
