"""Lightning imported without torchmetrics importing transformers (freqexp/lightning_import.py).

What is checked: a run's modules import Lightning and torchmetrics but not transformers, the
version hiding lasts only for that import (the real version afterwards, CLIPModel still
importable), the off switch gives torchmetrics' own behaviour back (so the first check can
fail), and the hiding answers only for the hidden package."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys

import pytest
from lightning_utilities.core.imports import RequirementCache

from freqexp import lightning_import

PROBE = """
import importlib.metadata as metadata, json, sys
import freqexp.training, freqexp.run
loaded = {m: m in sys.modules for m in ("lightning.pytorch", "torchmetrics", "transformers")}
finders = [type(f).__name__ for f in sys.meta_path]
version_after = metadata.version("transformers")
from transformers import CLIPModel
import transformers
print(json.dumps({"loaded": loaded, "finders": finders, "version_after": version_after,
                  "real": transformers.__version__, "clip": CLIPModel.__name__}))
"""


def probe(**env) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_run_imports_lightning_without_transformers_and_leaves_nothing_behind():
    out = probe()
    assert out["loaded"] == {"lightning.pytorch": True, "torchmetrics": True, "transformers": False}
    assert "_HideVersions" not in out["finders"]
    # after Lightning's import the version is the installed one, and transformers imports as usual
    assert out["version_after"] == out["real"] != "0"
    assert out["clip"] == "CLIPModel"


def test_the_off_switch_gives_torchmetrics_its_own_behaviour():
    # without the hiding torchmetrics does import transformers: the check above can fail
    assert probe(FREQEXP_HIDE_TRANSFORMERS="0")["loaded"]["transformers"] is True


def test_the_hiding_answers_only_for_the_hidden_package():
    hide = lightning_import._HideVersions(["transformers"])
    real_torch = metadata.version("torch")
    sys.meta_path.insert(0, hide)
    try:
        assert metadata.version("transformers") == "0"
        assert not RequirementCache("transformers>=4.4.0")  # how torchmetrics decides
        assert metadata.version("torch") == real_torch
        assert hide.find_spec("transformers") is None  # the module itself is still found
    finally:
        sys.meta_path.remove(hide)
    assert metadata.version("transformers") != "0"


def test_a_second_call_returns_the_imported_module_without_hiding():
    import lightning.pytorch

    before = list(sys.meta_path)
    assert lightning_import.import_lightning() is lightning.pytorch
    assert sys.meta_path == before


@pytest.mark.parametrize("name", ["transformers", "Transformers"])
def test_names_are_matched_as_importlib_normalizes_them(name):
    hide = lightning_import._HideVersions(["transformers"])
    found = list(hide.find_distributions(metadata.DistributionFinder.Context(name=name)))
    assert [d.version for d in found] == ["0"]
    assert list(hide.find_distributions(metadata.DistributionFinder.Context(name="torch"))) == []
