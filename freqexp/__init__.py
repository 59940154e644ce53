"""freqexp: Hydra-driven experiment sweeps for frequency-aware image anomaly detection."""
from freqexp.conf_source import register as _register_loss_source

__version__ = "0.1.0"

_register_loss_source()
