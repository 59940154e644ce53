"""Shared fixtures: composing the packaged config the way the CLI does, and reading MLflow."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import freqexp  # noqa: F401  (registers the loss config source)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists() and not (REPO / "data/fashion-mnist").exists(),
    reason="Fashion-MNIST not installed (make data)",
)
# Quick settings for runs inside tests.
FAST = ["trainer.max_epochs=1", "trainer.progress_bar=false", "tracking.figures=all"]


# Models on a frozen CLIP: their weights are not downloaded in tests; a tiny random CLIP saved
# once per session (tests/tiny_clip.py) stands in for them.
CLIP_MODELS = ("fe_clip", "winclip")


@functools.lru_cache(maxsize=None)
def tiny_clip_folder() -> str:
    import tempfile

    from tests.tiny_clip import save_tiny_clip

    return str(save_tiny_clip(Path(tempfile.mkdtemp(prefix="freqexp-tiny-clip-")) / "clip"))


def compose_cfg(overrides=()):
    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():
    return compose_cfg


@pytest.fixture
def store(tmp_path):
    """A fresh sqlite MLflow store in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def cli(args, cwd, env_extra=None, timeout=600):
    """Run `python -m freqexp ARGS` in `cwd` as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([PYTHON, "-m", "freqexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_runs(uri):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)
