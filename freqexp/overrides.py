"""Command-line overrides checked before Hydra composes anything, so a typo is one line with a
"did you mean", exit 2, and no run:

  model=CAE            unknown group option      -> the options of that group, the closest first
  trainer.epochs=3     a key no config has       -> the closest keys (trainer.max_epochs)
  +trainer.epochs=3    a new key no component reads (Hydra would add it silently, the run would
                       ignore it and MLflow would store it as if it mattered) -> refused
  loss=mse+sssim       an unknown loss term      -> the closest terms (a swept loss,
                       loss=mse,mse+foo, is left to its jobs: the bad one fails, the rest run)
  tracking.uri=x://y   a URI MLflow takes as no store -> the accepted forms (freqexp.tracking.check_uri)

Hydra's own flags (--multirun, --cfg job, ...) and hydra.* keys are left to Hydra; `++key`
(add or override) is a deliberate power-user form and is not checked. In a --multirun, each
value of a swept group is checked, and a key counts as known when any swept choice has it."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from freqexp.checks import did_you_mean

# nodes whose children are free-form (a weight or option per loss term)
OPEN_PREFIXES = ("loss.weights.", "loss.params.", "hydra.")


def conf_dir() -> Path:
    import freqexp.conf

    return Path(freqexp.conf.__file__).resolve().parent


def group_options() -> Dict[str, List[str]]:
    """{group: [options]} from the config tree (loss is served for any '+' spec, not listed)."""
    root = conf_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir())
            if d.is_dir() and d.name not in ("hydra", "__pycache__") and any(d.glob("*.yaml"))}


def sweep_presets() -> List[str]:
    import freqexp.sweeps

    return sorted(p.stem for p in Path(freqexp.sweeps.__file__).resolve().parent.glob("*.yaml"))


def uri_problem(values: Sequence[str]) -> Optional[str]:
    """The first tracking.uri value MLflow would not take as a store, as one line (interpolations
    are left to validation, which sees them resolved)."""
    from freqexp.errors import ConfigError
    from freqexp.tracking import check_uri

    for value in values:
        if "${" in value:
            continue
        try:
            check_uri(value, "tracking.uri")
        except ConfigError as e:
            return str(e)
    return None


def _plain_values(override) -> List[str]:
    """The string values of an override or of its sweep, as written (no escaping); [] for what
    this cannot list (globs, ranges, intervals)."""
    try:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - a glob needs the config loader; left to validation
        return []
    return [v for v in values if isinstance(v, str)]


def _values(override) -> List[str]:
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # ranges, intervals (Optuna): not group options
            return []
    value = override.value()
    return [value] if isinstance(value, str) else []


def leaf_keys(cfg, prefix: str = "") -> List[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        name = f"{prefix}{k}"
        keys += leaf_keys(node, name + ".") if isinstance(node, DictConfig) else [name]
        if isinstance(node, DictConfig):
            keys.append(name)  # a node is a valid key too (model.backbone)
    return keys


def compose_config(overrides: Sequence[str]):
    """The packaged config composed with `overrides`, as the CLI composes it (benchmarks, checks)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import freqexp  # noqa: F401  (registers the loss and sweep config sources)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def compose_keys(group_overrides: Sequence[str]) -> set:
    return set(leaf_keys(compose_config(group_overrides)))


def check(argv: Sequence[str]) -> Optional[str]:
    """The first problem in the command line's overrides, as one line; None when they look fine
    (anything this cannot judge is left to Hydra and to validation)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    overrides = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            overrides += parser.parse_overrides([arg])
        except HydraException:
            return None  # Hydra will explain its own syntax error
    groups = group_options()
    group_lines: List[str] = []
    swept: Dict[str, List[str]] = {}
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        name = key.split("@")[0].lstrip("/")
        if name == "tracking.uri":  # its form, now: MLflow's own error is a 430-character registry message
            problem = uri_problem(_plain_values(o))
            if problem:
                return problem
        if name == "sweep" and o.is_add():
            for v in _values(o):
                if v not in sweep_presets():
                    return f"sweep: no preset {v!r}{did_you_mean(v, sweep_presets())}; presets: {', '.join(sweep_presets())}"
            group_lines.append(o.input_line)
        elif name == "loss":
            from freqexp.losses import LOSS_TERMS

            values = _values(o)
            # a swept loss is left to its jobs: one bad value fails one job, and the sweep goes on
            for spec in values if len(values) == 1 else []:
                for term in (t.strip() for t in spec.split("+")):
                    if term and term not in LOSS_TERMS:
                        return (f"loss: unknown loss term {term!r} in {spec!r}{did_you_mean(term, LOSS_TERMS.names())}; "
                                f"known terms: {', '.join(LOSS_TERMS.names())} (join with '+')")
            if len(values) > 1:
                swept[name] = values
            group_lines.append(f"{o.key_or_group}={values[0]}" if values else o.input_line)
        elif name in groups:
            values = _values(o)
            for v in values:
                if v not in groups[name]:
                    return f"{name}: no option {v!r}{did_you_mean(v, groups[name])}; options: {', '.join(groups[name])}"
            if len(values) > 1:
                swept[name] = values
            group_lines.append(f"{o.key_or_group}={values[0]}" if values else o.input_line)
    key_overrides = [o for o in overrides if not o.key_or_group.startswith("hydra") and not o.is_delete()
                     and o.key_or_group.split("@")[0].lstrip("/") not in set(groups) | {"loss", "sweep"}]
    if not key_overrides:
        return None
    fixed = [line for line in group_lines if line.split("=")[0].lstrip("+").split("@")[0] not in swept]
    choices = [[f"{g}={v}" for v in vs] for g, vs in swept.items()]  # none swept: one composition

    def unknown(known: set) -> list:
        return [o for o in key_overrides if not (o.is_force_add() or o.key_or_group in known or o.key_or_group.startswith(OPEN_PREFIXES)
                                                 or (o.key_or_group.startswith("model.") and o.is_add()))]

    try:  # one composition (the first job's) settles most commands; the other jobs' only when a key is missing there
        combos = itertools.islice(itertools.product(*choices), 64)
        known = compose_keys(fixed + list(next(combos)))
        for combo in combos if unknown(known) else ():
            known |= compose_keys(fixed + list(combo))
    except Exception:
        return None  # a composition problem: Hydra reports it
    for o in unknown(known):
        key = o.key_or_group  # (+model.* is left to the model, which names its own options in one line)
        hint = did_you_mean(key, sorted(k for k in known if not k.startswith("hydra.")))
        if o.is_add():
            return f"{key}: no component reads it (+{key}=... would change nothing but the logged params){hint}"
        return f"{key}: no such key{hint}"
    return None
