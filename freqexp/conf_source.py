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


class OneGroupSource(ConfigSource):
    """A config source that serves one config group: the root lists the group, `group/<option>`
    is a config when `accepts(option)`. Subclasses give the group, options and nodes."""

    group: str

    def options(self) -> List[str]:
        raise NotImplementedError

    def accepts(self, option: str) -> bool:
        raise NotImplementedError

    def node(self, option: str) -> tuple[object, str]:
        """(config node, its package) for an accepted option."""
        raise NotImplementedError

    def _option(self, config_path: str) -> Optional[str]:
        path = self._normalize_file_name(config_path.strip("/"))
        if not path.startswith(self.group + "/"):
            return None
        option = path[len(self.group) + 1 : -len(".yaml")]
        return option if option and "/" not in option and self.accepts(option) else None

    def load_config(self, config_path: str) -> ConfigResult:
        option = self._option(config_path)
        if option is None:
            raise ConfigLoadError(f"{self.scheme()} has no {config_path}; {self.group} options: {', '.join(self.options())}")
        config, package = self.node(option)
        return ConfigResult(config=OmegaConf.create(config), path=f"{self.scheme()}://{self.path}",
                            provider=self.provider, header={"package": package})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", self.group)  # "" is the root, which holds the group

    def is_config(self, config_path: str) -> bool:
        return self._option(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        if path == "":  # the root lists the group itself
            return [self.group] if results_filter in (None, ObjectType.GROUP) else []
        if path != self.group or results_filter == ObjectType.GROUP:
            return []
        return self.options()


class LossSpecSource(OneGroupSource):
    group = GROUP

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def options(self) -> List[str]:
        from freqexp.losses.terms import LOSS_TERMS

        return LOSS_TERMS.names() + ["mse+ssim"]

    def accepts(self, option: str) -> bool:
        return True  # any spec composes; validation names unknown terms

    def node(self, option: str):
        return loss_node(option), GROUP


SWEEP_GROUP = "sweep"
SWEEP_SCHEME = "freqexp-sweeps"
SWEEP_PACKAGE = "freqexp.sweeps"  # the top-level sweeps/ folder, mapped into the package


def _sweep_files():
    from importlib.resources import files

    return files(SWEEP_PACKAGE)


def sweep_presets() -> List[str]:
    return sorted(p.name[: -len(".yaml")] for p in _sweep_files().iterdir() if p.name.endswith(".yaml"))


class SweepPresetSource(OneGroupSource):
    """Serves `sweep/<name>` from the yaml files of sweeps/, so `+sweep=<name>` picks a preset.
    sweeps/ sits at the top of the repo (not in conf/) and ships inside the package."""

    group = SWEEP_GROUP

    @staticmethod
    def scheme() -> str:
        return SWEEP_SCHEME

    def options(self) -> List[str]:
        return sweep_presets()

    def accepts(self, option: str) -> bool:
        return option in sweep_presets()

    def node(self, option: str):
        text = (_sweep_files() / f"{option}.yaml").read_text()
        return text, self._get_header_dict(text).get("package") or SWEEP_GROUP


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
