"""dataset.val_anomalies=pseudo must not validate a model on its own training generator
(dataset.pseudo_generator, dataset.pseudo_same_as_train), and generators whose masks do not cover
what they change (freq_cutpaste strategy=image_filter) are refused where a mask is a target."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from freqexp.augment import build_augment
from freqexp.augment.cutpaste import FrequencyCutPaste, PlainCutPaste, ScaledCutPaste
from freqexp.data import build_dataset
from freqexp.data.pseudo import (check_mask_generator, check_pseudo_validation, pseudo_generator, pseudo_generator_for,
                                 same_generator, trains_on_augment, with_pseudo_val)
from freqexp.errors import ConfigError
from freqexp.models import model_class

from tests.conftest import REPO, compose_cfg

PSEUDO = ["dataset=synthetic", "dataset.val_anomalies=pseudo"]


def plan(*overrides):
    """(cfg, whether its model trains on its augment), as make_plan would decide it."""
    cfg = compose_cfg([*PSEUDO, *overrides])
    return cfg, trains_on_augment(model_class(cfg.model.name), build_augment(cfg.augment))


def refusal(cfg, trains_on) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        check_pseudo_validation(cfg.dataset, cfg.augment, trains_on)
    assert "\n" not in str(e.value)  # one line for the user
    assert str(e.value).startswith(f"{e.value.key}: ")
    return e.value


@pytest.fixture(scope="module")
def data():
    return build_dataset(compose_cfg(["dataset=synthetic", "dataset.n_val=32"]).dataset)


# ----------------------------------------------------------------------------- who trains on what


def test_trains_on_augment_rule():
    cutpaste, noise = PlainCutPaste(), build_augment(compose_cfg(["augment=noise"]).augment)
    assert trains_on_augment(model_class("draem"), cutpaste)  # the segmenter learns these masks
    assert trains_on_augment(model_class("cae"), cutpaste)  # the AE learns to repair these pastes
    assert not trains_on_augment(model_class("cae"), noise)  # noise makes no pseudo-anomalies
    assert not trains_on_augment(model_class("patchcore"), cutpaste)  # gradient-free: never sees the augment


def test_same_generator_compares_what_shapes_the_pastes():
    assert same_generator(PlainCutPaste(p=0.5), PlainCutPaste(p=1.0))  # p only mixes pastes into batches
    assert same_generator(ScaledCutPaste(scale=(1.0, 1.0)), PlainCutPaste())  # scale 1 is plain CutPaste
    assert not same_generator(PlainCutPaste(area=(0.02, 0.3)), PlainCutPaste())
    assert not same_generator(ScaledCutPaste(), PlainCutPaste())
    assert not same_generator(FrequencyCutPaste(strategy="dual_path"), FrequencyCutPaste())
    # options a strategy does not read do not make another generator
    assert same_generator(FrequencyCutPaste(band_weights=(1, 1, 1, 1, 1)), FrequencyCutPaste())
    assert not same_generator(FrequencyCutPaste(strategy="freq_weighted", band_weights=(1, 1, 1, 1, 1)),
                              FrequencyCutPaste(strategy="freq_weighted"))


# ----------------------------------------------------------------------------- the refusal and its ways out


def test_draem_cutpaste_pseudo_val_is_refused():
    cfg, trains_on = plan("model=draem", "augment=cutpaste")
    assert trains_on
    e = refusal(cfg, trains_on)
    assert e.key == "dataset.pseudo_generator"
    for hint in ("augment=cutpaste", "dataset.pseudo_same_as_train=true", "scaled_cutpaste", "freq_cutpaste"):
        assert hint in e.message
    # the suggestions are ones that would be accepted (cutpaste itself is not among them)
    assert "pseudo_generator=freq_cutpaste | perlin | scaled_cutpaste" in e.message


def test_autoencoder_trained_with_cutpaste_is_refused_too():
    e = refusal(*plan("model=cae", "augment=cutpaste", "augment.p=1.0"))
    assert e.key == "dataset.pseudo_generator"


def test_explicit_pseudo_generator_equal_to_the_training_one_is_refused():
    e = refusal(*plan("model=draem", "augment=scaled_cutpaste", "dataset.pseudo_generator=scaled_cutpaste"))
    assert e.key == "dataset.pseudo_generator" and "scaled_cutpaste would make" in e.message
    # scaled_cutpaste with scale [1, 1] is plain cutpaste: auto (-> cutpaste) would be the same generator
    e = refusal(*plan("model=draem", "augment=scaled_cutpaste", "augment.scale=[1.0,1.0]"))
    assert e.key == "dataset.pseudo_generator"


@pytest.mark.parametrize("overrides", [
    ["model=draem", "augment=cutpaste", "dataset.pseudo_same_as_train=true"],   # explicit opt-in
    ["model=draem", "augment=cutpaste", "dataset.pseudo_generator=scaled_cutpaste"],
    ["model=draem", "augment=cutpaste", "dataset.pseudo_generator=freq_cutpaste"],
    ["model=draem", "augment=cutpaste", "augment.area=[0.05,0.3]"],  # auto -> default cutpaste: other pastes
    ["model=draem", "augment=scaled_cutpaste"],                       # auto -> plain cutpaste
    ["model=cae", "augment=freq_cutpaste"],                            # auto -> plain cutpaste
    ["model=cae", "augment=none"],                                     # nothing trained on: plain cutpaste
    ["model=patchcore", "augment=cutpaste"],                           # gradient-free: augment unused
    ["model=draem", "augment=cutpaste", "dataset.val_anomalies=defects"],  # real anomalies: nothing to check
])
def test_accepted_setups(overrides):
    cfg, trains_on = plan(*overrides)
    check_pseudo_validation(cfg.dataset, cfg.augment, trains_on)


@pytest.mark.parametrize("override,key", [
    ("dataset.pseudo_generator=noise", "dataset.pseudo_generator"),
    ("dataset.pseudo_generator=bogus", "dataset.pseudo_generator"),
    ("dataset.pseudo_same_as_train=3", "dataset.pseudo_same_as_train"),
])
def test_bad_option_values(override, key):
    cfg, trains_on = plan("augment=cutpaste", override)
    assert refusal(cfg, trains_on).key == key
    # checked even when val_anomalies is not pseudo, so a typo does not wait for the day it is used
    cfg = compose_cfg(["dataset=synthetic", "augment=cutpaste", override])
    assert refusal(cfg, True).key == key


def test_every_dataset_with_val_anomalies_has_the_new_keys():
    files = sorted((REPO / "conf" / "dataset").glob("*.yaml"))
    with_val = [f for f in files if "val_anomalies" in OmegaConf.load(f)]
    assert {f.stem for f in with_val} >= {"fashion_mnist", "folder", "mnist_idx", "mvtec", "synthetic", "tiff_domains"}
    for f in with_val:
        node = OmegaConf.load(f)
        assert node.pseudo_generator == "auto" and node.pseudo_same_as_train is False, f.name
        text = f.read_text()
        for key in ("pseudo_generator:", "pseudo_same_as_train:"):
            assert "#" in next(line for line in text.splitlines() if line.startswith(key)), f"{f.name}: {key} has no comment"


# ----------------------------------------------------------------------------- which generator makes val


def test_with_pseudo_val_uses_the_named_generator(data):
    cfg = compose_cfg([*PSEUDO, "augment=cutpaste", "dataset.pseudo_generator=scaled_cutpaste"])
    augment = build_augment(cfg.augment)
    gen = pseudo_generator_for(cfg.dataset, augment, trains_on=True)
    assert type(gen) is ScaledCutPaste and gen.scale == (0.5, 2.0)  # the registry's defaults
    by_name = with_pseudo_val(data, augment, seed=0, generator=cfg.dataset.pseudo_generator, trains_on=True)
    by_module = with_pseudo_val(data, augment, seed=0, generator=gen)
    explicit = with_pseudo_val(data, PlainCutPaste(), seed=0, generator=ScaledCutPaste(p=1.0))
    plain = with_pseudo_val(data, augment, seed=0)  # the old default: the configured cutpaste
    assert "ScaledCutPaste" in by_name.info["val_anomalies"]
    assert "PlainCutPaste" in plain.info["val_anomalies"]
    for other in (by_module, explicit):
        assert torch.equal(by_name.val.images, other.val.images) and torch.equal(by_name.val.masks, other.val.masks)
    n = int((data.val.labels == 0).sum())
    assert torch.equal(by_name.val.images[:n], plain.val.images[:n])  # the same normals
    assert not torch.equal(by_name.val.masks[n:], plain.val.masks[n:])  # other pastes
    # scaled patches: the masks' areas are no longer capped by cutpaste's area range (0.15 of the image)
    area = lambda d: d.val.masks[n:].flatten(1).float().mean(1)  # noqa: E731
    assert area(plain).max() <= 0.2
    assert area(by_name).max() > 0.2


@pytest.mark.parametrize("trains_on,same,expected", [
    (False, False, FrequencyCutPaste),  # not trained on: the configured augment, as before
    (True, False, PlainCutPaste),       # trained on: auto steps aside to plain cutpaste
    (True, True, FrequencyCutPaste),    # explicit opt-in: the training generator
])
def test_auto_rule(data, trains_on, same, expected):
    cfg = compose_cfg([*PSEUDO, "augment=freq_cutpaste", f"dataset.pseudo_same_as_train={str(same).lower()}"])
    augment = build_augment(cfg.augment)
    gen = pseudo_generator_for(cfg.dataset, augment, trains_on)
    assert type(gen) is expected
    if expected is FrequencyCutPaste:
        assert gen is augment  # with its configured options
    out = with_pseudo_val(data, augment, seed=0, generator="auto", trains_on=trains_on, same_as_train=same)
    assert expected.__name__ in out.info["val_anomalies"]


def test_pseudo_generator_defaults_keep_the_old_behaviour():
    freq = FrequencyCutPaste()
    assert pseudo_generator(freq) is freq
    assert type(pseudo_generator(build_augment(compose_cfg(["augment=noise"]).augment))) is PlainCutPaste


# ----------------------------------------------------------------------------- masks that do not cover the change


def test_mask_covers_change_is_truthful():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 32, 32)
    for strategy in ("patch_filter", "image_filter", "dual_path", "freq_weighted"):
        aug = FrequencyCutPaste(strategy=strategy)
        out, mask = aug.synthesize(x)
        outside = ((out - x).abs() > 1e-4) & ~mask
        assert aug.mask_covers_change == (not outside.any()), strategy
    out, mask = PlainCutPaste().synthesize(x)
    assert PlainCutPaste.mask_covers_change and not (((out - x).abs() > 0) & ~mask).any()


def test_check_mask_generator_refuses_image_filter_only():
    with pytest.raises(ConfigError) as e:
        check_mask_generator(FrequencyCutPaste(strategy="image_filter"))
    assert e.value.key == "augment.strategy" and "\n" not in str(e.value) and "image_filter" in e.value.message
    with pytest.raises(ConfigError) as e:
        check_mask_generator(FrequencyCutPaste(strategy="image_filter"), key="augment.strategy", use="DRAEM's segmentation target")
    assert "DRAEM" in e.value.message
    for aug in (PlainCutPaste(), ScaledCutPaste(), *(FrequencyCutPaste(strategy=s) for s in ("patch_filter", "dual_path", "freq_weighted"))):
        check_mask_generator(aug)


@pytest.mark.parametrize("overrides", [
    ["model=cae", "dataset.pseudo_same_as_train=true"],  # the opt-in does not make the masks valid
    ["model=patchcore"],                                  # not trained on: auto would pick the augment itself
])
def test_image_filter_as_pseudo_validation_generator_is_refused(overrides):
    e = refusal(*plan("augment=freq_cutpaste", "augment.strategy=image_filter", *overrides))
    assert e.key == "augment.strategy" and "image_filter" in e.message


def test_image_filter_training_stays_allowed_elsewhere():
    # plain augment training of an autoencoder, validated on real anomalies or on another generator
    for extra in (["dataset.val_anomalies=defects"], ["dataset.pseudo_generator=cutpaste"], []):
        cfg, trains_on = plan("model=cae", "augment=freq_cutpaste", "augment.strategy=image_filter", *extra)
        check_pseudo_validation(cfg.dataset, cfg.augment, trains_on)
