"""Config sources of freqexp: the `loss` group for any `+`-joined spec, and the `sweep` group
of presets in sweeps/.

The `loss` group: 

`loss=mse+ssim` names a group option, yet every combination of terms in any order is valid,
so no folder of yaml files can hold them all. This config source answers `loss/<spec>` with
    spec: <spec>
    weights: {<term>: 1.0, ...}
    params:  {<term>: {<option>: default, ...}, ...}
so that `loss.weights.ssim=0.5` and `loss.params.ssim.win_size=5` work from the command line.
Unknown terms still compose (a sweep must not die while composing one bad job); the run's
validation step rejects them with the list of known terms. A yaml file in conf/loss/ with the
same name takes precedence (presets with tuned weights)."""
from __future__ import annotations

from typing import List, Optional

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult, ConfigLoadError, ConfigSource
from omegaconf import OmegaConf

GROUP = "loss"
SCHEME = "freqexp-loss"


def loss_node(spec: str) -> dict:
    from freqexp.losses.terms import LOSS_TERMS

    names = [t.strip() for t in spec.split("+") if t.strip()]
    known = [n for n in names if n in LOSS_TERMS]
    return {
        "spec": spec,
        "weights": {n: 1.0 for n in known},
        "params": {n: dict(LOSS_TERMS.get(n).defaults) for n in known if LOSS_TERMS.get(n).defaults},
    }


class LossSpecSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _option(self, config_path: str) -> Optional[str]:
        path = self._normalize_file_name(config_path.strip("/"))
        if not path.startswith(GROUP + "/") or not path.endswith(".yaml"):
            return None
        option = path[len(GROUP) + 1 : -len(".yaml")]
        return option if option and "/" not in option else None

    def load_config(self, config_path: str) -> ConfigResult:
        option = self._option(config_path)
        if option is None:
            raise ConfigLoadError(f"{SCHEME} serves only {GROUP}/<spec>, not {config_path}")
        return ConfigResult(
            config=OmegaConf.create(loss_node(option)),
            path=f"{SCHEME}://{self.path}",
            provider=self.provider,
            header={"package": GROUP},
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP)  # "" is the root, which holds the group

    def is_config(self, config_path: str) -> bool:
        return self._option(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        if path == "":  # the root lists the group itself
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if path != GROUP or results_filter == ObjectType.GROUP:
            return []
        from freqexp.losses.terms import LOSS_TERMS

        return LOSS_TERMS.names() + ["mse+ssim"]


SWEEP_GROUP = "sweep"
SWEEP_SCHEME = "freqexp-sweeps"
SWEEP_PACKAGE = "freqexp.sweeps"  # the top-level sweeps/ folder, mapped into the package


def _sweep_files():
    from importlib.resources import files

    return files(SWEEP_PACKAGE)


def sweep_presets() -> List[str]:
    return sorted(p.name[: -len(".yaml")] for p in _sweep_files().iterdir() if p.name.endswith(".yaml"))


class SweepPresetSource(ConfigSource):
    """Serves `sweep/<name>` from the yaml files of sweeps/, so `+sweep=<name>` picks a preset.
    sweeps/ sits at the top of the repo (not in conf/) and ships inside the package."""

    @staticmethod
    def scheme() -> str:
        return SWEEP_SCHEME

    def _option(self, config_path: str) -> Optional[str]:
        path = self._normalize_file_name(config_path.strip("/"))
        if not path.startswith(SWEEP_GROUP + "/"):
            return None
        option = path[len(SWEEP_GROUP) + 1 : -len(".yaml")]
        return option if option in sweep_presets() else None

    def load_config(self, config_path: str) -> ConfigResult:
        option = self._option(config_path)
        if option is None:
            raise ConfigLoadError(f"no sweep preset {config_path}; presets: {', '.join(sweep_presets())}")
        text = (_sweep_files() / f"{option}.yaml").read_text()
        header = self._get_header_dict(text)
        return ConfigResult(
            config=OmegaConf.create(text),
            path=f"{SWEEP_SCHEME}://{self.path}",
            provider=self.provider,
            header={"package": header.get("package") or SWEEP_GROUP},
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", SWEEP_GROUP)

    def is_config(self, config_path: str) -> bool:
        return self._option(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        if path == "":
            return [SWEEP_GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if path != SWEEP_GROUP or results_filter == ObjectType.GROUP:
            return []
        return sweep_presets()


def known_terms() -> str:
    from freqexp.losses.terms import LOSS_TERMS

    return ", ".join(LOSS_TERMS.names())


def register() -> None:
    """OmegaConf resolvers used by the help text. The config sources themselves are registered
    by Hydra's plugin discovery (hydra_plugins/freqexp_sources.py), in every process."""
    if not OmegaConf.has_resolver("freqexp_sweep_presets"):
        OmegaConf.register_new_resolver("freqexp_sweep_presets", lambda: ", ".join(sweep_presets()))
    # `--help` lists groups without the primary config's search path, so the help text
    # names the loss terms through this resolver instead.
    if not OmegaConf.has_resolver("freqexp_loss_terms"):
        OmegaConf.register_new_resolver("freqexp_loss_terms", known_terms)
