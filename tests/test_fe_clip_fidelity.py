"""Fidelity of FE-CLIP (Gong et al., ICCV 2025) and zero-shot WinCLIP (Jeong et al., CVPR 2023, as
anomalib implements it) against their definitions. Every expected value is written here from the
formula, with numpy / scipy.fft.dctn(norm="ortho") / idctn / scipy.special.erf, or taken from a
plain transformers CLIPModel loaded on its own; never by calling the code under test twice.

FE-CLIP, the paper's definitions used here:
- FFE (sec. 3.3): non-overlapping P x P windows, a 2-D DCT per window and channel, Linear + GELU,
  the inverse DCT per window.
- LFS (sec. 3.4): the DCT of the Q x Q window around every token, the mean over its Q x Q
  responses, a convolution + GELU.
- Eq. 2: f' = lam (f_ffe + f_lfs) + (1 - lam) f on the patch tokens; f' feeds the next blocks.
- Eq. 1: P(c | f) = softmax over {normal, anomalous} of cos(g_c, f) / tau, a cosine: both the
  text embedding g_c and the visual embedding f have unit length inside it.
- Eq. 3: image score and map are the means over the taps. Eq. 4, 5: per-tap BCE and
  focal + dice of the upsampled map, averaged over taps.

The choices the paper leaves open are the ones freqexp documents (orthonormal DCT-II, the FFE
Linear over channels, replicate padding, a 3 x 3 zero-padded LFS conv, tau 0.07, post_layernorm
before fc, fc initialised from CLIP's projection, bilinear upsampling with align_corners=False).

Eq. 1 is a cosine: the text embeddings must have unit length (tested on their own and through the
image probabilities); the other tests put unit-length text embeddings into the model's buffer
(after checking that their direction is the CLIP text features'), so each tests its own step."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.fft import dctn, idctn
from scipy.signal import correlate2d
from scipy.special import erf

from freqexp.errors import ConfigError
from freqexp.models import build_model
from freqexp.models.clip import layer_choice, prompt_texts
from freqexp.models.fe_clip import FFEAdapter, LFSAdapter, binary_focal_loss, dice_loss
from freqexp.models.winclip import harmonic_patch_scores, window_index
from tests.tiny_clip import save_tiny_clip

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ("A photo of a normal object", "A photo of a damaged object")
TAU = 0.07


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """The tiny random CLIP: 4 blocks, width 32, 32 px images, 8 px patches (a 4 x 4 grid)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def reference(clip_folder):
    """A plain transformers CLIPModel and its tokenizer, loaded on their own."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_folder))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(clip_folder))


@pytest.fixture(scope="module")
def winclip_text(reference) -> np.ndarray:
    """[2, E]: WinCLIP's class embeddings, the mean of the raw prompt embeddings per class
    (normalised only inside the cosine); each of the 242 prompts encoded alone."""
    return np.stack([text_features(reference, texts).mean(0) for texts in prompt_texts("object")])


@pytest.fixture(scope="module")
def scaled_clip_folder(clip_folder, tmp_path_factory):
    """The same CLIP with logit_scale = log(50) (its random init is log(1/0.07), which would not
    tell CLIP's own temperature from 0.07)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_folder))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    folder = tmp_path_factory.mktemp("scaled") / "clip"
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(clip_folder)).save_pretrained(str(folder))
    return folder


def fe_clip(folder, size: int = 32, **options):
    clip = {"name": str(folder)}
    if size != 32:
        clip["image_size"] = size
    model = build_model(OmegaConf.create({"name": "fe_clip", "clip": clip, **options}), (3, size, size))
    return model.eval()


def winclip(folder, **options):
    return build_model(OmegaConf.create({"name": "winclip", "clip": {"name": str(folder)}, **options}), (3, 32, 32)).eval()


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, size, size))).float()


def clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """CLIP's input normalisation, written out: (x - mean) / std per channel."""
    return ((x.double() - torch.from_numpy(MEAN).view(1, 3, 1, 1)) / torch.from_numpy(STD).view(1, 3, 1, 1)).float()


def text_features(reference, texts) -> np.ndarray:
    """Raw CLIP text features, each prompt tokenised alone (no padding): [len(texts), E]."""
    model, tokenizer = reference
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt")["input_ids"]
            f = model.get_text_features(input_ids=ids)
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            out.append(f[0].double().numpy())
    return np.stack(out)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def softmax_anomalous(emb: np.ndarray, text: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 1: softmax over the two classes of cos(g_c, f) / tau, the anomalous entry."""
    logits = unit(emb) @ unit(text).T / tau
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[..., 1]


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, exact (erf) form."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """[..., g, g] -> [..., size, size], bilinear with align_corners=False: the output pixel o
    samples the input at s = (o + 0.5) g / size - 0.5 (clamped at 0), between floor(s) and the
    next index (clamped at g - 1)."""
    g = grid.shape[-1]
    s = np.maximum((np.arange(size) + 0.5) * g / size - 0.5, 0.0)
    i0 = np.floor(s).astype(int)
    i1 = np.minimum(i0 + 1, g - 1)
    frac = s - i0
    rows = grid[..., i0, :] * (1 - frac)[:, None] + grid[..., i1, :] * frac[:, None]
    return rows[..., i0] * (1 - frac) + rows[..., i1] * frac


def layernorm(x: np.ndarray, ln) -> np.ndarray:
    """LayerNorm with the module's weight, bias and eps, written out."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * ln.weight.detach().double().numpy() + ln.bias.detach().double().numpy()


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def use_unit_text(model) -> None:
    """Make the FE-CLIP text buffer unit-length whatever the model stores (tested on its own: eq. 1 is a
    cosine), so the tests that use it check their own step."""
    with torch.no_grad():
        model.text.copy_(torch.nn.functional.normalize(model.text, dim=-1))


# ----------------------------------------------------------------------------- 1. FFE adapter
def ffe_expected(f: np.ndarray, weight: np.ndarray, bias: np.ndarray, p: int) -> np.ndarray:
    """FFE on [B, D, H, W]: the border replicated at the bottom and right up to a multiple of P
    (np.pad mode="edge"), per P x P window and channel dctn(norm="ortho"), the Linear over the
    channels per coefficient, GELU, idctn(norm="ortho") per window, cropped back to H x W."""
    b, d, h, w = f.shape
    x = np.pad(f, ((0, 0), (0, 0), (0, (-h) % p), (0, (-w) % p)), mode="edge")
    out = np.empty_like(x)
    for n in range(b):
        for r in range(0, x.shape[2], p):
            for c in range(0, x.shape[3], p):
                coef = np.stack([dctn(x[n, ch, r:r + p, c:c + p], norm="ortho") for ch in range(d)])  # [D, P, P]
                mixed = gelu(np.einsum("ed,duv->euv", weight, coef) + bias[:, None, None])
                out[n, :, r:r + p, c:c + p] = np.stack([idctn(mixed[ch], norm="ortho") for ch in range(d)])
    return out[:, :, :h, :w]


@pytest.mark.parametrize("shape,p", [
    ((2, 5, 6, 9), 3),   # H, W multiples of P
    ((2, 5, 4, 4), 2),
    ((1, 4, 7, 5), 3),   # not multiples: the code pads by replicating the border (bottom, right), then crops back
    ((2, 3, 4, 4), 3),   # the tiny CLIP's 4 x 4 grid
])
def test_ffe_adapter_is_block_dct_linear_gelu_inverse_dct(shape, p):
    torch.manual_seed(1)
    adapter = FFEAdapter(shape[1], p)
    f = np.random.default_rng(2).normal(size=shape)
    with torch.no_grad():
        got = adapter(torch.from_numpy(f).float()).double().numpy()
    want = ffe_expected(f, np_of(adapter.linear.weight), np_of(adapter.linear.bias), p)
    assert got.shape == f.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ffe_adapter_windows_do_not_overlap():
    # a change inside one P x P window changes the output in that window only
    torch.manual_seed(0)
    adapter = FFEAdapter(4, 3)
    f = torch.randn(1, 4, 6, 6)
    g = f.clone()
    g[0, :, 4, 1] += 1.0  # inside the window rows 3..5, cols 0..2
    with torch.no_grad():
        diff = (adapter(g) - adapter(f)).abs().amax(1)[0]
    changed = diff > 1e-6
    assert changed[3:6, 0:3].any()
    changed[3:6, 0:3] = False
    assert not changed.any()


# ----------------------------------------------------------------------------- 2. LFS adapter
def lfs_statistic_expected(f: np.ndarray, q: int, statistic: str) -> np.ndarray:
    """Per token, the mean over the Q x Q dctn(norm="ortho") coefficients of the window centred on
    it (border replicated), signed / |coef| / coef^2."""
    b, d, h, w = f.shape
    r = q // 2
    x = np.pad(f, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    out = np.empty_like(f)
    for n, ch, i, j in itertools.product(range(b), range(d), range(h), range(w)):
        coef = dctn(x[n, ch, i:i + q, j:j + q], norm="ortho")
        coef = {"signed": coef, "abs": np.abs(coef), "power": coef ** 2}[statistic]
        out[n, ch, i, j] = coef.mean()
    return out


def conv_gelu_expected(s: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv2d(D, D, 3, zero padding 1) + GELU: out[e] = bias[e] + sum_d correlate(s[d], K[e, d])."""
    b, d, h, w = s.shape
    out = np.empty((b, weight.shape[0], h, w))
    for n in range(b):
        for e in range(weight.shape[0]):
            out[n, e] = bias[e] + sum(correlate2d(s[n, ch], weight[e, ch], mode="same", boundary="fill") for ch in range(d))
    return gelu(out)


@pytest.mark.parametrize("statistic", ["signed", "abs", "power"])
@pytest.mark.parametrize("shape,q", [((2, 4, 6, 6), 3), ((1, 3, 4, 5), 3), ((1, 3, 7, 6), 5)])
def test_lfs_adapter_is_sliding_dct_mean_then_conv_gelu(statistic, shape, q):
    torch.manual_seed(3)
    adapter = LFSAdapter(shape[1], q, statistic)
    f = np.random.default_rng(4).normal(size=shape)
    stat = lfs_statistic_expected(f, q, statistic)
    with torch.no_grad():
        got_stat = adapter.statistics(torch.from_numpy(f).float()).double().numpy()
        got = adapter(torch.from_numpy(f).float()).double().numpy()
    np.testing.assert_allclose(got_stat, stat, atol=1e-5)
    want = conv_gelu_expected(stat, np_of(adapter.conv.weight), np_of(adapter.conv.bias))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_lfs_signed_mean_is_a_fixed_3x3_filter():
    # mean_uv (C X C^T)_uv = sum_ij w_i w_j X_ij with w_i = (1/3) sum_u C_ui: w ~ (1.693, -0.239, 0.278) / 3
    w = np.array([1.693, -0.239, 0.278]) / 3
    kernel = np.outer(w, w)
    adapter = LFSAdapter(2, 3, "signed")
    # the impulse response: a single 1 at (3, 4) of a zero map; stat[3 + 1 - i, 4 + 1 - j] = kernel[i, j]
    delta = torch.zeros(1, 2, 7, 8)
    delta[0, :, 3, 4] = 1.0
    with torch.no_grad():
        response = adapter.statistics(delta)[0, 0].double().numpy()
    got = response[2:5, 3:6][::-1, ::-1]
    np.testing.assert_allclose(got, kernel, atol=1e-3)
    assert got[0, 0] == pytest.approx(0.318, abs=1e-3)
    outside = response.copy()
    outside[2:5, 3:6] = 0
    assert np.abs(outside).max() < 1e-6
    # on a random map (border replicated) the signed statistic is that filter
    f = np.random.default_rng(5).uniform(-1, 1, size=(1, 2, 6, 6))
    padded = np.pad(f, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    want = np.stack([correlate2d(padded[0, ch], kernel, mode="valid") for ch in range(2)])[None]
    with torch.no_grad():
        stat = adapter.statistics(torch.from_numpy(f).float()).double().numpy()
    np.testing.assert_allclose(stat, want, atol=1e-3)


# ----------------------------------------------------------------------------- 3. fusion, eq. 1-3
def fusion_expected(f: np.ndarray, model, n: int, lam: float) -> np.ndarray:
    """Eq. 2 on [B, D, H, W] with tap n's adapters' weights: lam (FFE + LFS) + (1 - lam) f."""
    p, q = model.dct_window
    ffe = ffe_expected(f, np_of(model.ffe[n].linear.weight), np_of(model.ffe[n].linear.bias), p)
    lfs = conv_gelu_expected(lfs_statistic_expected(f, q, model.lfs_statistic),
                             np_of(model.lfs[n].conv.weight), np_of(model.lfs[n].conv.bias))
    return lam * (ffe + lfs) + (1 - lam) * f


def tokens_to_map(tokens: np.ndarray) -> np.ndarray:
    """[B, L, D] patch tokens (row-major over the grid) -> [B, D, g, g]."""
    b, length, d = tokens.shape
    g = int(round(math.sqrt(length)))
    return tokens.reshape(b, g, g, d).transpose(0, 3, 1, 2)


def map_to_tokens(f: np.ndarray) -> np.ndarray:
    b, d, g, _ = f.shape
    return f.transpose(0, 2, 3, 1).reshape(b, g * g, d)


def frozen_hidden_states(reference, x: torch.Tensor, interpolate: bool = False):
    """The plain CLIP vision tower's hidden states: [0] the embeddings, [i + 1] after block i."""
    model, _ = reference
    with torch.no_grad():
        out = model.vision_model(pixel_values=clip_pixels(x), output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return [np_of(h) for h in out.hidden_states]


def tap_image_probabilities(reference, hidden, taps, text, tau=TAU) -> np.ndarray:
    """[N, B]: eq. 1 of visual_projection(post_layernorm(class token after block i)) per tap i."""
    model, _ = reference
    proj = np_of(model.visual_projection.weight)
    return np.stack([softmax_anomalous(layernorm(hidden[i + 1][:, 0], model.vision_model.post_layernorm) @ proj.T, text, tau)
                     for i in taps])


@pytest.mark.parametrize("size", [32, 48])  # a 4 x 4 grid (padded for P = 3) and a 6 x 6 one
def test_lam0_taps_are_the_frozen_clip_hidden_states(clip_folder, reference, size):
    model = fe_clip(clip_folder, size, fusion_weight=0.0)
    assert model.taps == [0, 1, 2, 3]
    x = images(2, size)
    hidden = frozen_hidden_states(reference, x, interpolate=size != 32)
    assert len(hidden) == 5
    with torch.no_grad():
        classes, patches = model.encode(x)
    for n, i in enumerate(model.taps):
        np.testing.assert_allclose(np_of(classes[n]), hidden[i + 1][:, 0], atol=1e-5)
        np.testing.assert_allclose(np_of(patches[n]), hidden[i + 1][:, 1:], atol=1e-5)


@pytest.mark.parametrize("size", [32, 48])
def test_eq2_fusion_on_patch_tokens_feeds_the_next_blocks(clip_folder, reference, size):
    lam = 0.3
    model = fe_clip(clip_folder, size, fusion_weight=lam, taps=[1, 3])
    torch.manual_seed(7)
    with torch.no_grad():  # adapters far from their init, so that eq. 2 changes the tokens visibly
        for m in list(model.ffe) + list(model.lfs):
            for prm in m.parameters():
                prm.normal_(0, 0.3)
    x = images(2, size, seed=1)
    ref, _ = reference
    seen = {}

    def hook(i):
        def fuse(module, inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            h = np_of(hidden)
            fused = map_to_tokens(fusion_expected(tokens_to_map(h[:, 1:]), model, model.taps.index(i), lam))
            seen[i] = (h[:, 0].copy(), fused)
            new = torch.from_numpy(np.concatenate([h[:, :1], fused], axis=1)).to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, (tuple, list)) else new
        return fuse

    handles = [ref.vision_model.encoder.layers[i].register_forward_hook(hook(i)) for i in model.taps]
    try:
        with torch.no_grad():
            ref.vision_model(pixel_values=clip_pixels(x), interpolate_pos_encoding=size != 32)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        classes, patches = model.encode(x)
    for n, i in enumerate(model.taps):
        cls, fused = seen[i]
        np.testing.assert_allclose(np_of(classes[n]), cls, atol=1e-4)  # the class token is not adapted
        np.testing.assert_allclose(np_of(patches[n]), fused, atol=1e-4)
    # and the adaptation did something: block 3's tokens differ from the frozen CLIP's
    plain = frozen_hidden_states(reference, x, interpolate=size != 32)
    assert np.abs(np_of(patches[1]) - plain[4][:, 1:]).max() > 1e-2


def test_prompt_embeddings_point_along_clip_text_features(clip_folder, reference):
    model = fe_clip(clip_folder)
    want = unit(text_features(reference, PROMPTS))
    np.testing.assert_allclose(unit(np_of(model.text)), want, atol=1e-5)


@pytest.mark.parametrize("prompts", ["fe_clip", "winclip"])
def test_eq1_image_probabilities_use_cosines(clip_folder, reference, winclip_text, prompts):
    model = fe_clip(clip_folder, fusion_weight=0.0, prompts=prompts)
    x = images(3, seed=2)
    if prompts == "fe_clip":
        text = text_features(reference, PROMPTS)
    else:
        text = winclip_text
    want = tap_image_probabilities(reference, frozen_hidden_states(reference, x), model.taps, text)
    with torch.no_grad():
        image, _ = model.tap_outputs(x)
    np.testing.assert_allclose(np_of(image), want, atol=1e-5)


@pytest.mark.parametrize("prompts", ["fe_clip", "winclip"])
def test_eq1_text_embeddings_have_unit_length(clip_folder, prompts):
    model = fe_clip(clip_folder, prompts=prompts)
    np.testing.assert_allclose(np_of(model.text.norm(dim=-1)), 1.0, atol=1e-5)


def test_eq1_eq3_image_probabilities_and_score_with_unit_text(clip_folder, reference):
    model = fe_clip(clip_folder, fusion_weight=0.0)
    use_unit_text(model)
    x = images(3, seed=3)
    want = tap_image_probabilities(reference, frozen_hidden_states(reference, x), model.taps, text_features(reference, PROMPTS))
    with torch.no_grad():
        image, _ = model.tap_outputs(x)
        _, score = model.score(x)
    np.testing.assert_allclose(np_of(image), want, atol=1e-5)
    np.testing.assert_allclose(np_of(score), want.mean(0), atol=1e-5)  # eq. 3: the mean over the taps
    assert want.std(0).max() > 1e-4  # the taps differ, so the mean is a real check


# ----------------------------------------------------------------------------- 4. the map
def tap_maps(reference, hidden, taps, fc_weight, text, tau, size) -> np.ndarray:
    """[N, B, size, size]: eq. 1 of fc(post_layernorm(patch tokens after block i)), the anomalous
    probability on the grid, bilinear to the image."""
    model, _ = reference
    out = []
    for i in taps:
        tokens = layernorm(hidden[i + 1][:, 1:], model.vision_model.post_layernorm)  # [B, L, D]
        p = softmax_anomalous(tokens @ fc_weight.T, text, tau)  # [B, L]
        g = int(round(math.sqrt(p.shape[1])))
        out.append(bilinear(p.reshape(-1, g, g), size))
    return np.stack(out)


def test_fc_patch_starts_as_clips_visual_projection(clip_folder, reference):
    model = fe_clip(clip_folder)
    np.testing.assert_array_equal(np_of(model.fc_patch.weight), np_of(reference[0].visual_projection.weight))
    assert model.fc_patch.bias is None
    assert model.fc_patch.weight.requires_grad
    assert not fe_clip(clip_folder, fc_patch="frozen").fc_patch.weight.requires_grad


@pytest.mark.parametrize("trained_fc", [False, True])
def test_eq1_eq3_map_is_mean_of_upsampled_tap_maps(clip_folder, reference, trained_fc):
    model = fe_clip(clip_folder, fusion_weight=0.0)
    use_unit_text(model)
    if trained_fc:  # the map reads fc_patch, not CLIP's projection
        torch.manual_seed(9)
        with torch.no_grad():
            model.fc_patch.weight.normal_(0, 0.2)
    x = images(2, seed=4)
    want = tap_maps(reference, frozen_hidden_states(reference, x), model.taps, np_of(model.fc_patch.weight),
                    text_features(reference, PROMPTS), TAU, 32)
    with torch.no_grad():
        _, maps = model.tap_outputs(x)
        m, _ = model.score(x)
    assert maps.shape == (4, 2, 1, 32, 32) and m.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(np_of(maps[:, :, 0]), want, atol=1e-5)
    np.testing.assert_allclose(np_of(m[:, 0]), want.mean(0), atol=1e-5)


def test_temperature_logit_scale_is_clips_own(scaled_clip_folder, reference):
    model = fe_clip(scaled_clip_folder, fusion_weight=0.0, temperature="logit_scale")
    assert model.temperature == pytest.approx(1 / 50.0, rel=1e-5)  # tau = 1 / exp(logit_scale)
    use_unit_text(model)
    x = images(2, seed=5)
    # the scaled folder differs from the tiny CLIP in logit_scale only: the towers are the reference's
    want = tap_maps(reference, frozen_hidden_states(reference, x), model.taps, np_of(model.fc_patch.weight),
                    text_features(reference, PROMPTS), 1 / 50.0, 32)
    with torch.no_grad():
        m, _ = model.score(x)
    np.testing.assert_allclose(np_of(m[:, 0]), want.mean(0), atol=1e-5)


# ----------------------------------------------------------------------------- 5. losses
def focal_np(p: np.ndarray, t: np.ndarray, gamma: float) -> float:
    p_t = np.where(t > 0.5, p, 1 - p)
    return float(np.mean(-((1 - p_t) ** gamma) * np.log(p_t)))


def dice_np(p: np.ndarray, t: np.ndarray) -> float:
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    return float(1 - np.mean((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)))


@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_focal_and_dice_losses(gamma):
    rng = np.random.default_rng(6)
    p = rng.uniform(0.01, 0.99, size=(3, 1, 8, 8))
    t = rng.random((3, 1, 8, 8)) < 0.3
    got_focal = float(binary_focal_loss(torch.from_numpy(p).float(), torch.from_numpy(t), gamma))
    assert got_focal == pytest.approx(focal_np(p, t, gamma), rel=1e-5)
    got_dice = float(dice_loss(torch.from_numpy(p).float(), torch.from_numpy(t)))
    assert got_dice == pytest.approx(dice_np(p, t), rel=1e-5)
    if gamma == 0.0:  # gamma 0: the plain binary cross-entropy
        bce = float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
        assert got_focal == pytest.approx(bce, rel=1e-5)


def test_dice_of_a_perfect_prediction_is_zero_apart_from_smoothing():
    t = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    t[0, 0, :2, :2] = True
    # image 0: (2*4 + 1) / (4 + 4 + 1) = 1; image 1 (empty both): (0 + 1) / (0 + 0 + 1) = 1
    assert float(dice_loss(t.float(), t)) == pytest.approx(0.0, abs=1e-7)


def test_eq4_eq5_supervised_loss_from_the_per_tap_outputs(clip_folder, reference):
    w_image, w_mask, gamma = 0.7, 1.3, 2.0
    model = fe_clip(clip_folder, fusion_weight=0.0, w_image=w_image, w_mask=w_mask, focal_gamma=gamma)
    use_unit_text(model)
    x = images(3, seed=7)
    labels = torch.tensor([0, 1, 1])
    masks = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    masks[1, 0, 4:12, 8:20] = True
    masks[2, 0, 20:30, 2:9] = True
    hidden = frozen_hidden_states(reference, x)
    text = text_features(reference, PROMPTS)
    image = tap_image_probabilities(reference, hidden, model.taps, text)  # [N, B]
    maps = tap_maps(reference, hidden, model.taps, np_of(model.fc_patch.weight), text, TAU, 32)  # [N, B, H, W]
    y = labels.numpy().astype(float)
    cls = np.mean([np.mean(-(y * np.log(s) + (1 - y) * np.log(1 - s))) for s in image])  # eq. 4
    t = masks.numpy()[:, 0]
    focal = np.mean([focal_np(m, t, gamma) for m in maps])  # eq. 5, per tap then the mean
    dice = np.mean([dice_np(m, t) for m in maps])
    with torch.no_grad():
        total, parts = model.supervised_loss(x, labels, masks)
    assert float(parts["cls"]) == pytest.approx(cls, rel=1e-4)
    assert float(parts["focal"]) == pytest.approx(focal, rel=1e-4)
    assert float(parts["dice"]) == pytest.approx(dice, rel=1e-4)
    assert float(total) == pytest.approx(w_image * cls + w_mask * (focal + dice), rel=1e-4)


# ----------------------------------------------------------------------------- 6. taps
@pytest.mark.parametrize("taps,want", [("last4", [0, 1, 2, 3]), ("even", [0, 1, 2, 3]), ("late", [2, 3]), ([1, 3], [1, 3])])
def test_taps_on_four_blocks(clip_folder, taps, want):
    model = fe_clip(clip_folder, taps=taps)
    assert model.taps == want
    assert len(model.ffe) == len(model.lfs) == len(want)  # one FFE and one LFS adapter per tap


@pytest.mark.parametrize("taps,want", [("last4", [20, 21, 22, 23]), ("even", [0, 8, 15, 23]), ("late", [12, 16, 20, 23])])
def test_taps_on_24_blocks(taps, want):
    assert layer_choice(taps, 24) == want


@pytest.mark.parametrize("bad", ["first4", [4], [-1], [], [True], 3, [0, "x"]])
def test_bad_taps_name_the_key(clip_folder, bad):
    with pytest.raises(ConfigError) as e:
        fe_clip(clip_folder, taps=bad)
    assert e.value.key == "model.taps"
    assert str(e.value).startswith("model.taps:")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- 7. WinCLIP
def windows_loop(grid: int, k: int) -> list[tuple[int, ...]]:
    """Every k x k window of a grid x grid patch grid (stride 1), its tokens row-major."""
    return [tuple((r + i) * grid + (c + j) for i in range(k) for j in range(k))
            for r in range(grid - k + 1) for c in range(grid - k + 1)]


@pytest.mark.parametrize("grid,k", [(g, k) for g in (3, 4, 6) for k in range(1, g + 1)])
def test_window_index_covers_exactly_the_windows(grid, k):
    got = [tuple(int(v) for v in row) for row in window_index(grid, k)]
    want = windows_loop(grid, k)
    assert len(got) == (grid - k + 1) ** 2
    assert sorted(got) == sorted(want)
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("grid,k", [(4, 2), (4, 3), (5, 2), (6, 3)])
def test_harmonic_patch_scores(grid, k):
    windows = windows_loop(grid, k)
    scores = np.random.default_rng(8).uniform(0.05, 1.0, size=(2, len(windows)))
    index = window_index(grid, k)
    order = [windows.index(tuple(int(v) for v in row)) for row in index]  # the code's window order
    got = np_of(harmonic_patch_scores(torch.from_numpy(scores[:, order]).float(), index, grid * grid))
    want = np.empty((2, grid * grid))
    for b in range(2):
        for patch in range(grid * grid):
            s = [scores[b, w] for w, win in enumerate(windows) if patch in win]
            want[b, patch] = len(s) / sum(1 / v for v in s)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# WinCLIP's 22 templates (the original WinCLIP code's list; anomalib 2.x ships 21, one listed twice)
WINCLIP_TEMPLATES = [f"a {kind} photo of {art} {{}}." for kind in ("cropped", "close-up", "bright", "dark", "jpeg corrupted", "blurry")
                     for art in ("a", "the")] + \
                    [f"a photo of {art} {size}{{}}." for size in ("", "small ", "large ") for art in ("a", "the")] + \
                    [f"a photo of {art} {{}} for {use}." for use in ("visual inspection", "anomaly detection") for art in ("a", "the")]
WINCLIP_NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage"]
WINCLIP_ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]


def test_winclip_prompt_ensemble_counts():
    normal, anomalous = prompt_texts("object")
    assert len(normal) == 7 * 22 and len(anomalous) == 4 * 22
    assert len(WINCLIP_TEMPLATES) == 22
    assert sorted(normal) == sorted(t.format(s.format("object")) for s in WINCLIP_NORMAL for t in WINCLIP_TEMPLATES)
    assert sorted(anomalous) == sorted(t.format(s.format("object")) for s in WINCLIP_ANOMALOUS for t in WINCLIP_TEMPLATES)
    assert all("object" in t for t in normal + anomalous)
    assert "a photo of a damaged object." in anomalous and "a photo of a flawless object." in normal




def test_winclip_zero_shot_image_score(clip_folder, reference, winclip_text):
    model = winclip(clip_folder, scales=[2])
    x = images(3, seed=9)
    ref, _ = reference
    with torch.no_grad():
        emb = ref.get_image_features(pixel_values=clip_pixels(x))
    emb = np_of(emb if isinstance(emb, torch.Tensor) else emb.pooler_output)
    want = softmax_anomalous(emb, winclip_text, TAU)
    with torch.no_grad():
        _, score = model.score(x)
    np.testing.assert_allclose(np_of(score), want, atol=1e-5)


def test_winclip_window_of_the_whole_grid_is_the_image(clip_folder):
    # k = grid: the single window holds every patch token, in order, with the class token: the whole image
    model = winclip(clip_folder, scales=[4])
    x = images(2, seed=10)
    with torch.no_grad():
        maps, score = model.score(x)
        windows, index = model.window_scores(model.clip.embed(clip_pixels(x)), 4)
    assert windows.shape == (2, 1)
    np.testing.assert_allclose(np_of(windows[:, 0]), np_of(score), atol=1e-5)
    # every patch is covered by that one window; the harmonic mean of two equal layers is that value
    np.testing.assert_allclose(np_of(maps[:, 0]), np.broadcast_to(np_of(score)[:, None, None], (2, 32, 32)), atol=1e-5)


def test_winclip_map_from_windows_encoded_alone(clip_folder, reference, winclip_text):
    # each k x k window: its position-embedded patch tokens with the class token, through the whole
    # plain CLIP tower; per scale the harmonic mean over the windows covering a patch; then the
    # harmonic mean of (image score, scale 2, scale 3); bilinear to the image
    model = winclip(clip_folder, scales=[2, 3])
    ref, _ = reference
    x = images(2, seed=11)
    text = winclip_text
    v = ref.vision_model
    with torch.no_grad():
        tokens = v.embeddings(clip_pixels(x))  # [B, 1 + 16, D]
        image = softmax_anomalous(np_of(ref.visual_projection(v.post_layernorm(v.encoder(inputs_embeds=v.pre_layrnorm(tokens)).last_hidden_state[:, 0]))), text, TAU)
        layers = [np.broadcast_to(image[:, None], (2, 16))]
        for k in (2, 3):
            windows = windows_loop(4, k)
            per_window = []
            for win in windows:
                seq = torch.cat([tokens[:, :1], tokens[:, [1 + t for t in win]]], dim=1)
                out = v.encoder(inputs_embeds=v.pre_layrnorm(seq)).last_hidden_state[:, 0]
                per_window.append(softmax_anomalous(np_of(ref.visual_projection(v.post_layernorm(out))), text, TAU))
            per_window = np.stack(per_window, 1)  # [B, n_windows]
            patch = np.empty((2, 16))
            for t in range(16):
                s = per_window[:, [w for w, win in enumerate(windows) if t in win]]
                patch[:, t] = s.shape[1] / (1 / s).sum(1)
            layers.append(patch)
    combined = 3 / sum(1 / layer for layer in layers)
    want = bilinear(combined.reshape(2, 4, 4), 32)
    with torch.no_grad():
        maps, _ = model.score(x)
    np.testing.assert_allclose(np_of(maps[:, 0]), want, atol=1e-5)


# ----------------------------------------------------------------------------- 8. state dict
def test_state_dict_holds_the_learnt_parts_only(clip_folder, tmp_path):
    torch.manual_seed(0)
    model = fe_clip(clip_folder, fusion_weight=0.2)
    with torch.no_grad():
        model.fc_patch.weight.add_(0.5)
    state = model.state_dict()
    assert not any(k.startswith("clip.") or ".clip." in k for k in state)
    want = {f"{kind}.{n}.{layer}.{p}" for kind, layer in (("ffe", "linear"), ("lfs", "conv")) for n in range(4)
            for p in ("weight", "bias")} | {"fc_patch.weight"}
    assert set(state) == want
    torch.save(state, tmp_path / "model.pt")
    torch.manual_seed(123)
    fresh = fe_clip(clip_folder, fusion_weight=0.2)
    assert not torch.equal(fresh.ffe[0].linear.weight, model.ffe[0].linear.weight)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = images(1, seed=12)
    with torch.no_grad():
        a, b = model.score(x), fresh.score(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert winclip(clip_folder, scales=[2]).state_dict() == {}
