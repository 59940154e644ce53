"""Import Lightning without the text and CLIP metrics its torchmetrics would set up.

Lightning imports torchmetrics, and torchmetrics, when the `transformers` package is installed,
imports it at once (`from transformers import AutoModel, AutoTokenizer`, CLIPModel, ...) for its
BERTScore, InfoLM, CLIPScore and CLIP-IQA metrics. freqexp never uses torchmetrics, and
`transformers` is installed for the CLIP models (model=fe_clip, winclip), which import it
themselves when they are built; on 2 CPU cores that import is 1.8-2.4 s of every process's start
(`benchmarks/import_time.py --lightning`). So while Lightning is imported, and only then,
torchmetrics' version check reads version 0 for `transformers`: it skips those four metrics, and
`import transformers` itself works as before. `FREQEXP_HIDE_TRANSFORMERS=0`, or importing
`lightning` before freqexp (in a plugin, say), keeps torchmetrics' own behaviour.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys
from typing import Iterator

# packages whose version torchmetrics reads (then imports them) and a freqexp run never needs there
HIDDEN_FROM_TORCHMETRICS = ("transformers",)


class _VersionZero(metadata.Distribution):
    """An installed-looking distribution at version 0: a `>=` requirement on it is not met."""

    def __init__(self, name: str):
        self._name = name

    def read_text(self, filename: str):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: 0\n"
        return None

    def locate_file(self, path):  # pragma: no cover - never asked for files
        return path


def _normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _HideVersions:
    """A `sys.meta_path` entry that finds no module, and answers first for these distributions."""

    def __init__(self, names):
        self.names = frozenset(_normalized(n) for n in names)

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()) -> Iterator:
        name = getattr(context, "name", None)
        if name and _normalized(name) in self.names:  # a listing of every distribution (no name) is left alone
            return iter([_VersionZero(name)])
        return iter(())


def hiding_wanted(modules=None, environ=None) -> bool:
    """Only before torchmetrics has read the versions (it keeps what it read), unless switched off."""
    modules = sys.modules if modules is None else modules
    environ = os.environ if environ is None else environ
    untouched = "lightning.pytorch" not in modules and "torchmetrics" not in modules
    return untouched and environ.get("FREQEXP_HIDE_TRANSFORMERS", "1") != "0"


def import_lightning():
    """`lightning.pytorch`, imported with torchmetrics' optional packages hidden the first time."""
    if hiding_wanted():
        hide = _HideVersions(HIDDEN_FROM_TORCHMETRICS)
        sys.meta_path.insert(0, hide)
        try:
            import lightning.pytorch  # noqa: F401
        finally:
            sys.meta_path.remove(hide)
    import lightning.pytorch as L

    return L
