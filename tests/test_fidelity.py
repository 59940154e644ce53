"""Fidelity: each method named after a paper computes what the paper (and its official code)
computes. Every expected value here is written from the reference formula in this file, with
numpy / scipy, never by calling the code under test.

References: FAIR (Liu et al., 2023; github.com/liutongkun/FAIR, data_loaderbhpf.py), PatchCore
(Roth et al., CVPR 2022, eq. 7; amazon-science/patchcore-inspection), DRAEM (Zavrtanik et al.,
ICCV 2021; VitjanZ/DRAEM, test_DRAEM.py), WEDGE-Net (aura1999jmpark/WEDGE-Net, model.py), MemAE
(Gong et al., ICCV 2019; donggong1/memae-anomaly-detection, models/memory_module.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freqexp.freq import build_filter
from tests.conftest import compose_cfg


# ----------------------------------------------------------------------------- FAIR's BHPF
def fair_bhpf_numpy(gray: np.ndarray, d0: float = 30.0, n: int = 2) -> np.ndarray:
    """FAIR's data loader, step by step: fft2, fftshift, H = 1 / (1 + (D0 / (D + 1e-6))^(2n)) with
    D the distance of each shifted bin from (rows/2, cols/2), ifftshift, ifft2, real part."""
    rows, cols = gray.shape
    crow, ccol = rows // 2, cols // 2
    y, x = np.ogrid[:rows, :cols]
    dist = np.sqrt((x - ccol) ** 2 + (y - crow) ** 2)
    h = 1.0 / (1.0 + (d0 / (dist + 1e-6)) ** (2 * n))
    return np.real(np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(gray)) * h)))


def test_butterworth_high_pass_values_at_chosen_radii():
    # H(D) = 1 / (1 + (D0 / D)^(2n)) at D0 = 30 px, n = 2, on a 256 px grid (D in frequency samples)
    module, _ = build_filter(compose_cfg(["filter=fair"]).filter)
    mask = module.mask(256, 256, "cpu").double().numpy()
    for d, want in ((15, 1 / (1 + 2.0**4)), (30, 0.5), (60, 1 / (1 + 0.5**4))):
        assert mask[0, int(d)] == pytest.approx(want, abs=1e-6), d  # bin (0, d) lies at D = d
        assert mask[int(d), 0] == pytest.approx(want, abs=1e-6), d
    # at a tenth of Nyquist (D = 12.8 px -> the bin D = 13 nearest to it) FAIR passes ~0.035 of the amplitude
    assert mask[0, 13] == pytest.approx(1 / (1 + (30 / 13) ** 4), abs=1e-6)
    assert mask[0, 13] < 0.04
    assert mask[0, 0] == 0.0


def test_fair_preset_equals_fairs_filter_on_256px_images():
    module, placement = build_filter(compose_cfg(["filter=fair"]).filter)
    assert placement == "input"
    gray = np.random.default_rng(0).random((256, 256))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray), atol=2e-5)


@pytest.mark.parametrize("size", [28, 64])
def test_fair_preset_keeps_fairs_proportion_at_other_sizes(size):
    # D0 scales with the image: 30 px at 256 -> 30 * size / 256 px
    module, _ = build_filter(compose_cfg(["filter=fair"]).filter)
    gray = np.random.default_rng(1).random((size, size))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray, d0=30 * size / 256), atol=2e-5)


def test_cutoff_in_pixels_is_fairs_d0_at_any_size():
    module, _ = build_filter(compose_cfg(["filter=fft", "filter.unit=px", "filter.cutoff=30"]).filter)
    gray = np.random.default_rng(2).random((128, 128))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray, d0=30), atol=2e-5)
