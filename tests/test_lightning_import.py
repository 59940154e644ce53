"""Lightning imported without torchmetrics importing transformers (freqexp/lightning_import.py).

What is checked: a run's modules import Lightning and torchmetrics but not transformers, the
version hiding lasts only for that import (the real version afterwards, CLIPModel still
importable), the off switch gives torchmetrics' own behaviour back (so the first check can
fail), and the hiding answers only for the hidden package."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_nothing_is_hidden_once_lightning_is_imported(monkeypatch):
    import lightning.pytorch

    made = []
    monkeypatch.setattr(lightning_import, "_HideVersions", lambda names: made.append(names))
    assert lightning_import.import_lightning() is lightning.pytorch
    assert made == []


@pytest.mark.parametrize("modules, environ, wanted", [
    ({}, {}, True),
    ({}, {"FREQEXP_HIDE_TRANSFORMERS": "1"}, True),
    ({}, {"FREQEXP_HIDE_TRANSFORMERS": "0"}, False),
    ({"torchmetrics": None}, {}, False),  # torchmetrics has read the versions already and keeps them
    ({"lightning.pytorch": None}, {}, False),
    ({"lightning": None, "torch": None}, {}, True),
])
def test_when_the_hiding_is_wanted(modules, environ, wanted):
    assert lightning_import.hiding_wanted(modules, environ) is wanted


def direct_imports(source: str) -> list[int]:
    """Lines that import Lightning or torchmetrics themselves, with no import_lightning() call before them."""
    lines, called, found = source.splitlines(), False, []
    for i, line in enumerate(lines, 1):
        if re.match(r"\s*(import|from)\s+(lightning|pytorch_lightning|torchmetrics)\b", line) and not called:
            found.append(i)
        called = called or "import_lightning()" in line
    return found


def test_every_lightning_import_in_freqexp_goes_through_import_lightning():
    # a plain `import lightning` anywhere in the package would be the first one in some command
    assert direct_imports("import torch\nfrom lightning.pytorch.callbacks import Callback\n") == [2]
    assert direct_imports("L = import_lightning()\nfrom lightning.pytorch.callbacks import Callback\n") == []
    root = Path(lightning_import.__file__).parent
    direct = {str(p.relative_to(root)): direct_imports(p.read_text()) for p in sorted(root.rglob("*.py"))
              if p.name != "lightning_import.py"}
    assert {k: v for k, v in direct.items() if v} == {}


@pytest.mark.parametrize("name", ["transformers", "Transformers", "TRANSFORMERS"])
def test_names_are_matched_as_importlib_normalizes_them(name):
    hide = lightning_import._HideVersions(["transformers"])
    found = list(hide.find_distributions(metadata.DistributionFinder.Context(name=name)))
    assert [d.version for d in found] == ["0"]
    assert list(hide.find_distributions(metadata.DistributionFinder.Context(name="torch"))) == []
    # a listing of every distribution gets nothing from it (no fake entry beside the real one)
    assert list(hide.find_distributions(metadata.DistributionFinder.Context())) == []


def test_names_with_separators_are_matched_both_ways():
    hide = lightning_import._HideVersions(["sentence_transformers"])
    for asked in ("sentence-transformers", "Sentence.Transformers", "sentence__transformers"):
        assert [d.version for d in hide.find_distributions(metadata.DistributionFinder.Context(name=asked))] == ["0"]
