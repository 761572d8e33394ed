"""The joint-attention forms beyond "text + image" on a GPU, and what image-only attention costs a model that
has it.

    python recipes/benchmarks/layouts_h200.py layers --out OUT   # one layer per form, 4096 px, r = 16
    python recipes/benchmarks/layouts_h200.py sd35 --out OUT     # SD3.5-Medium-shaped step at 4096 px

layers: FLUX shapes (24 heads x 128, 512 text tokens, 256 x 256 image tokens in the kernels' tile layout), one
attention call per form and backend through the op (``clear_surgery.plugins.attention``), each beside the
dense cuDNN call of the same tokens: plain text + image; image queries alone (PRX, NucleusMoE-Image); 32
register tokens joined with the text (AuraFlow: 544 global tokens); a text padding mask (112 of the 512 text
tokens padded, as padded packed sequences bring); image-only self-attention (--image-attention local).
Every CLEAR row also gives its relative error against the triton backend's plain call on the same rows
where one exists.
sd35: SD3.5 Medium's transformer (random bf16 weights; its first 13 blocks have an image-only attention
``attn2``; SD3.5 Large has none, so there the two CLEAR rows are one) at 4096 px: dense, CLEAR on the joint
attention, CLEAR on both (image_attention="local"), r = 16, tile layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clear_surgery.plugins import attention
from clear_surgery.plugins.triton_backend import kernel_config
from clear_surgery.surgery.tools.bench import time_ms

DENSE = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
SIDE, TEXT, HEADS, DIM, RADIUS = 256, 512, 24, 128, 16.0


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def dense_ms(q, k, v, mask=None) -> float:
    # a mask: the memory-efficient kernel takes it (the math fallback would need the whole score matrix)
    with sdpa_kernel(DENSE if mask is None else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
                     set_priority=True):
        return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask), 2, 5)


def layer_rows() -> list[dict]:
    tile = kernel_config(DIM).tile
    gen = torch.Generator(device="cuda").manual_seed(0)
    image = SIDE * SIDE

    def qkv(text):
        return [torch.randn(1, text + image, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(3)]

    padding = torch.ones(1, 1, 1, TEXT + image, dtype=torch.bool, device="cuda")
    padding[..., TEXT - 112:TEXT] = False
    forms = {"plain": (TEXT, {}, False), "image queries alone": (TEXT, {}, True),
             "32 registers with the text": (TEXT + 32, {}, False),
             "text padding mask": (TEXT, {"attn_mask": padding}, False), "image-only": (0, {}, False)}
    rows = []
    for form, (text, options, queries_alone) in forms.items():
        q, k, v = qkv(text)
        rows_kept = slice(text, None)
        kwargs = dict(text_len=text, text_first=True, height=SIDE, width=SIDE, radius=RADIUS, tile=tile, **options)
        q_in = q[:, rows_kept].contiguous() if queries_alone else q
        want = attention(q, k, v, **kwargs, backend="triton")[:, rows_kept]
        row = {"form": form, "global_tokens": text, "queries": q_in.shape[1],
               "dense_ms": dense_ms(q_in, k, v, options.get("attn_mask"))}
        for backend in ("auto", "triton", "gluon", "flex"):
            try:
                got = attention(q_in, k, v, **kwargs, backend=backend)
            except ValueError as err:
                row[f"{backend}_refused"] = str(err)[:200]
                continue
            row[f"{backend}_ms"] = time_ms(lambda: attention(q_in, k, v, **kwargs, backend=backend), 2, 5)
            row[f"{backend}_rel_err_vs_triton"] = rel_err(got if queries_alone else got[:, rows_kept], want)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, q_in, want
        torch.cuda.empty_cache()
    return rows


SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def sd35_rows(size: int = 4096) -> dict:
    from diffusers import SD3Transformer2DModel

    from clear_surgery.surgery import ClearConfig, analyze, apply_clear, example_inputs, remove_clear

    with torch.device("meta"):
        analysis = analyze(SD3Transformer2DModel(**SD35_MEDIUM))
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=gen)
        for buffer in model.buffers():  # the position embedding's table (its values do not change the timing)
            buffer.normal_(0, 0.02, generator=gen)
    side = size // 16
    inputs = example_inputs(model, text_len=333, grid=(side, side))
    row = {"model": "SD3.5-Medium-shaped, random bf16 weights", "res": size, "radius": RADIUS,
           "image_only_sites": sum(1 for s in analysis.sites if s.kind == "image")}
    with torch.no_grad():
        with sdpa_kernel(DENSE, set_priority=True):
            row["dense_ms"] = time_ms(lambda: model(**inputs), 1, 3)
        print(json.dumps(row), flush=True)
        for local in ("dense", "local"):
            apply_clear(model, ClearConfig(radius=RADIUS, token_layout="tiled", image_attention=local),
                        analysis=analysis, verify=False)
            row[f"clear_image_attention_{local}_ms"] = time_ms(lambda: model(**inputs), 1, 3)
            remove_clear(model)
            print(json.dumps(row), flush=True)
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layers", "sd35"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result = {**meta, "rows": layer_rows()} if args.what == "layers" else {**meta, **sd35_rows()}
    (args.out / f"layouts-{args.what}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
