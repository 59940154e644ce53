"""Hydra discovers plugins in the `hydra_plugins` namespace package in every process that
composes a config (also joblib / submitit workers), so freqexp's config sources live here:
`loss=<any spec>` and `+sweep=<preset>` (see freqexp/conf_source.py)."""
from freqexp.conf_source import LossSpecSource, SweepPresetSource  # noqa: F401
