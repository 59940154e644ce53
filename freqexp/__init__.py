"""freqexp: Hydra-driven experiment sweeps for frequency-aware image anomaly detection."""
import importlib as _importlib
import importlib.util as _util
import os as _os

# An installed freqexp carries its config tree as freqexp.conf and freqexp.sweeps (pyproject maps
# the top-level conf/ and sweeps/ there). A source checkout used without installing it
# (PYTHONPATH=checkout, e.g. on a machine without a package index) takes them from beside the package.
if _util.find_spec("freqexp.conf") is None:
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __path__.append(_root)  # noqa: F821 - this package's own __path__, for these two imports only
    try:
        _importlib.import_module("freqexp.conf")
        _importlib.import_module("freqexp.sweeps")
    finally:
        __path__.remove(_root)  # noqa: F821

from freqexp.conf_source import register as _register_loss_source  # noqa: E402

__version__ = "0.1.0"

_register_loss_source()
