"""Frequency analyses: one function per `analysis=<name>` option, each returning tables
(pandas DataFrames), figures and a short text verdict. `python -m freqexp.analyze` runs one
and logs everything to MLflow (CSV + PNG)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

from freqexp.registry import Registry


@dataclass
class AnalysisResult:
    tables: Dict[str, "object"]  # name -> pandas.DataFrame
    figures: List[Path] = field(default_factory=list)
    summary: str = ""
    metrics: Dict[str, float] = field(default_factory=dict)


ANALYSES: Registry[Callable[..., AnalysisResult]] = Registry("analysis", "analysis.name")

from freqexp.analysis import spectra, trained  # noqa: E402,F401  (registration)
