"""Batched torch frequency filtering vs a per-image numpy loop, in one process.

    .venv/bin/python benchmarks/filters.py [--repeats 3] [--device cuda]

For each filter (Butterworth high-pass FFT, haar DWT high-pass, DCT high 90 %) and each batch
(1024x1x28x28, 64x3x256x256) it times freqexp's module on the whole batch and a numpy loop that
filters one image (and channel) at a time with the same transfer function / pywt, checks both
agree, and prints images/s and the speed-up (goal >= 50x)."""
from __future__ import annotations

import argparse
import time

import numpy as np
import pywt
import scipy.fft
import torch

from freqexp.freq.dct import DCTFilter, low_frequency_mask
from freqexp.freq.dwt import DWTFilter
from freqexp.freq.fft import FFTFilter, transfer_function


def numpy_fft(images: np.ndarray, h: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for i in range(images.shape[0]):
        for c in range(images.shape[1]):
            out[i, c] = np.fft.ifft2(np.fft.fft2(images[i, c]) * h).real
    return out


def numpy_dwt(images: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for i in range(images.shape[0]):
        for c in range(images.shape[1]):
            ca, details = pywt.dwt2(images[i, c], "haar", mode="periodization")
            out[i, c] = pywt.idwt2((np.zeros_like(ca), details), "haar", mode="periodization")
    return out


def numpy_dct(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for i in range(images.shape[0]):
        for c in range(images.shape[1]):
            out[i, c] = scipy.fft.idctn(scipy.fft.dctn(images[i, c], norm="ortho") * mask, norm="ortho")
    return out


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where freqexp's filters run (cpu or cuda); the numpy loop is always the CPU")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, filters on {where}; best of {args.repeats}")
    print(f"{'filter':<22}{'batch':<16}{'torch img/s':>14}{'numpy img/s':>14}{'speed-up':>10}{'max |diff|':>12}")
    for shape in [(1024, 1, 28, 28), (64, 3, 256, 256)]:
        x_cpu = torch.rand(shape)
        xn = x_cpu.numpy().astype(np.float64)
        x = x_cpu.to(device)
        h, w = shape[-2:]
        cases = [
            ("fft butterworth hp", FFTFilter("butterworth", "high", 0.2, 2),
             lambda: numpy_fft(xn, transfer_function(h, w, "butterworth", "high", 0.2, 2).double().numpy())),
            ("dwt haar high-pass", DWTFilter("haar", 1, ["LH", "HL", "HH"]), lambda: numpy_dwt(xn)),
            ("dct high 90%", DCTFilter("high", 0.9), lambda: numpy_dct(xn, (~low_frequency_mask(h, w, 0.1)).numpy().astype(float))),
        ]
        for name, module, reference in cases:
            module = module.to(device)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            with torch.no_grad():
                module(x)  # warm-up: builds and caches the masks
                sync()
                t_torch = best_time(lambda: (module(x), sync()), args.repeats)
                ours = module(x).cpu().numpy()
            t_np = best_time(reference, max(1, args.repeats - 2))
            diff = float(np.abs(ours - reference()).max())
            n = shape[0]
            print(f"{name:<22}{'x'.join(map(str, shape)):<16}{n / t_torch:>14,.0f}{n / t_np:>14,.0f}{t_np / t_torch:>9.1f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
