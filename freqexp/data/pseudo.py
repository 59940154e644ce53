"""Pseudo-anomalies as labelled validation anomalies (dataset.val_anomalies=pseudo): CutPaste-
family images made from held-out normals, with pixel masks. They are drawn under
dataset.split_seed, so every run of a sweep validates on the same images.

Which generator makes them (dataset.pseudo_generator, dataset.pseudo_same_as_train):
    auto             the configured augment if it synthesizes pseudo-anomalies and the model does not
                     train on it (or dataset.pseudo_same_as_train=true); otherwise plain cutpaste with
                     its default options
    cutpaste | scaled_cutpaste | freq_cutpaste
                     that augment with its default options (not the configured augment's)
A model "trains on" the augment when it has needs_pseudo_anomalies (DRAEM: its segmenter learns
exactly these pastes and masks), or when the augment synthesizes and the model is trained by
gradients (an autoencoder learns to repair exactly these pastes; gradient-free memory banks never
see the augment). Validating such a model on its own training generator would make val/auroc,
the threshold, the best-epoch restore and the sweep objective measure self-consistency, so
check_pseudo_validation refuses it unless dataset.pseudo_same_as_train=true. "The same generator"
means equal synthesis_key(): the same kind and the same options that shape the pastes (p, which
only mixes them into training batches, does not count). A generator whose mask does not cover
what it changes (freq_cutpaste strategy=image_filter) is refused as a pseudo-validation set."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from freqexp.data.base import OneClassData, Split
from freqexp.errors import ConfigError

AUTO = "auto"


def synthesizing_augments() -> list[str]:
    """Names of the registered augments that synthesize pseudo-anomalies with masks."""
    from freqexp.augment import AUGMENTS

    return [n for n in AUGMENTS.names() if hasattr(AUGMENTS.get(n), "synthesize")]


def pseudo_generator_choices() -> list[str]:
    return [AUTO, *synthesizing_augments()]


def trains_on_augment(model, augment: nn.Module) -> bool:
    """Whether `model` (a model instance or class) learns from `augment`'s synthesize() pastes:
    it needs pseudo-anomalies (DRAEM), or the augment synthesizes and the model is trained by
    gradients (the augmented batches are its inputs). Gradient-free models never see the augment."""
    if getattr(model, "needs_pseudo_anomalies", False):
        return True
    return hasattr(augment, "synthesize") and not getattr(model, "gradient_free", False)


def same_generator(a: nn.Module, b: nn.Module) -> bool:
    """True when both synthesize pseudo-anomalies from the same distribution (equal synthesis_key)."""
    key_a, key_b = getattr(a, "synthesis_key", None), getattr(b, "synthesis_key", None)
    if key_a is None or key_b is None:
        return False
    return key_a() == key_b()


def pseudo_generator(augment: nn.Module, name: str = AUTO, trains_on: bool = False, same_as_train: bool = False) -> nn.Module:
    """The module whose synthesize() makes the validation anomalies (the rule in the module doc).
    With the defaults: the configured augment when it synthesizes, else plain CutPaste."""
    if name != AUTO:
        from freqexp.augment import AUGMENTS

        if name not in synthesizing_augments():
            raise ConfigError("dataset.pseudo_generator", f"must be one of {' | '.join(pseudo_generator_choices())}; got {name!r}")
        return AUGMENTS.get(name)(p=1.0)
    if hasattr(augment, "synthesize") and (same_as_train or not trains_on):
        return augment
    from freqexp.augment.cutpaste import PlainCutPaste

    return PlainCutPaste(p=1.0)


def pseudo_generator_for(dataset_cfg, augment: nn.Module, trains_on: bool) -> nn.Module:
    """pseudo_generator() with the options of the dataset config (absent keys: auto, false)."""
    name, same = _options(dataset_cfg)
    return pseudo_generator(augment, name, trains_on, same)


def _options(dataset_cfg) -> tuple[str, bool]:
    name = dataset_cfg.get("pseudo_generator", AUTO)
    choices = pseudo_generator_choices()
    if not isinstance(name, str) or name not in choices:
        raise ConfigError("dataset.pseudo_generator", f"must be one of {' | '.join(choices)}; got {name!r}")
    same = dataset_cfg.get("pseudo_same_as_train", False)
    if not isinstance(same, bool):
        raise ConfigError("dataset.pseudo_same_as_train", f"must be true or false; got {same!r}")
    return name, same


def check_pseudo_validation(dataset_cfg, augment_cfg, model_trains_on_augment: bool) -> None:
    """Refuse (ConfigError, one line) a dataset.val_anomalies=pseudo setup that would validate the
    model on the very generator it trains on (unless dataset.pseudo_same_as_train=true), or on a
    generator whose masks do not cover what it changes. Pure: builds the augment, reads no data.
    `model_trains_on_augment`: trains_on_augment(model, augment) of the planned model."""
    name, same = _options(dataset_cfg)
    if dataset_cfg.get("val_anomalies") != "pseudo":
        return
    from freqexp.augment import build_augment

    augment = build_augment(augment_cfg)
    generator = pseudo_generator(augment, name, model_trains_on_augment, same)
    if not getattr(generator, "mask_covers_change", True):
        raise ConfigError("augment.strategy", f"augment={augment_cfg.name} strategy={generator.strategy} changes every pixel while its mask marks "
                          "only the pasted patch, so its pseudo-anomalies would differ from the validation normals everywhere "
                          "(trivially detected); use another strategy, or dataset.pseudo_generator="
                          + " | ".join(synthesizing_augments()))
    if not model_trains_on_augment or same or not same_generator(generator, augment):
        return
    others = [n for n in synthesizing_augments() if not same_generator(pseudo_generator(augment, n), augment)]
    picked = f"auto (= {'the augment' if generator is augment else 'cutpaste with its default options'})" if name == AUTO else name
    raise ConfigError("dataset.pseudo_generator", f"{picked} would make the dataset.val_anomalies=pseudo images with the same pastes as "
                      f"augment={augment_cfg.name}, which the model trains on, so val/auroc, the threshold, the best epoch and the sweep "
                      f"objective would measure self-consistency; use dataset.pseudo_generator={' | '.join(others)}, real validation "
                      "anomalies (another dataset.val_anomalies), or dataset.pseudo_same_as_train=true to accept it")


def check_mask_generator(augment: nn.Module, key: str = "augment.strategy", use: str = "a segmentation target") -> None:
    """Refuse (ConfigError naming `key`) a generator whose mask does not cover every pixel it
    changes (freq_cutpaste strategy=image_filter) where the mask is `use`, e.g. DRAEM's target."""
    if getattr(augment, "mask_covers_change", True):
        return
    what = f"strategy={augment.strategy}" if hasattr(augment, "strategy") else type(augment).__name__
    raise ConfigError(key, f"{what} changes every pixel of the image while its mask marks only the pasted patch, so the mask is no "
                      f"valid {use} (a segmenter would learn 'filtered or not'); use strategy=patch_filter | dual_path | freq_weighted")


def with_pseudo_val(data: OneClassData, augment: nn.Module, seed: int, generator: Union[str, nn.Module, None] = None,
                    trains_on: bool = False, same_as_train: bool = False) -> OneClassData:
    """Val = its normals + as many pseudo-anomalies (at least one) made from them under `seed`.
    `generator`: a module with synthesize(), or a dataset.pseudo_generator value resolved by
    pseudo_generator(augment, generator, trains_on, same_as_train); None = auto."""
    val = data.val
    normal = val.labels == 0
    normals = val.images[normal]
    n_anom = max(1, int(val.n_anomalous) or int(normal.sum()))
    if generator is None or isinstance(generator, str):
        generator = pseudo_generator(augment, generator or AUTO, trains_on, same_as_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pick = torch.randint(len(normals), (n_anom,))
        x = normals[pick].float()
        x = x / 255.0 if normals.dtype == torch.uint8 else x
        aug, mask = generator.synthesize(x)
        for _ in range(10):  # a patch pasted onto its own source changes nothing: draw again
            empty = ~mask.flatten(1).any(1)
            if not empty.any():
                break
            aug[empty], mask[empty] = generator.synthesize(x[empty])
    if normals.dtype == torch.uint8:
        anomalies = (aug * 255).round().clamp(0, 255).to(torch.uint8)
    else:  # float sensor maps keep their precision
        anomalies = aug.clamp(0, 1).to(normals.dtype)
    h, w = normals.shape[-2:]
    masks = torch.cat([torch.zeros(len(normals), 1, h, w, dtype=torch.bool), mask.cpu()])
    labels = torch.cat([torch.zeros(len(normals), dtype=torch.long), torch.ones(n_anom, dtype=torch.long)])
    new_val = Split(torch.cat([normals, anomalies]), labels, masks)
    return OneClassData(data.train, new_val, data.test, {**data.info, "val_anomalies": f"pseudo ({type(generator).__name__})"})


def with_expanded_train(data: OneClassData, augment: nn.Module) -> OneClassData:
    """flip_rot-style augments enlarge the training set once, before training."""
    if not hasattr(augment, "expand"):
        return data
    images = augment.expand(data.train.images)
    train = Split(images, torch.zeros(len(images), dtype=torch.long))
    return OneClassData(train, data.val, data.test, data.info)
