"""A tiny random CLIP (transformers' CLIPConfig: few layers, small width, 32 px images) and a
byte-level tokenizer, saved with save_pretrained into a folder: what `model.clip.name=<folder>`
loads offline. No download anywhere."""
from __future__ import annotations

import json
from pathlib import Path


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            symbols.append(256 + extra)
            extra += 1
    return [chr(c) for c in symbols]


def save_tiny_clip(folder, image_size: int = 32, patch_size: int = 8, layers: int = 4, width: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_symbols()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
