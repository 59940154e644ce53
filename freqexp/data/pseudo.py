"""Pseudo-anomalies as labelled validation anomalies (dataset.val_anomalies=pseudo): CutPaste-
family images made from held-out normals, with pixel masks. They are drawn under
dataset.split_seed, so every run of a sweep validates on the same images."""
from __future__ import annotations

import torch
from torch import nn

from freqexp.data.base import OneClassData, Split


def pseudo_generator(augment: nn.Module) -> nn.Module:
    """The configured augment when it synthesizes anomalies, else plain CutPaste."""
    if hasattr(augment, "synthesize"):
        return augment
    from freqexp.augment.cutpaste import PlainCutPaste

    return PlainCutPaste(p=1.0)


def with_pseudo_val(data: OneClassData, augment: nn.Module, seed: int) -> OneClassData:
    val = data.val
    normal = val.labels == 0
    normals = val.images[normal]
    n_anom = max(1, int(val.n_anomalous) or int(normal.sum()))
    generator = pseudo_generator(augment)
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
