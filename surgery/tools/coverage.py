"""Coverage of MMDiT families in the installed diffusers: analysis (and rewrite where it fits) on
tiny configs. ``clear-surgery coverage`` prints the table README.md carries (a test keeps them equal).

The tiny builders here are the coverage data (one per row); whether a row converts is decided by
the model family registry (surgery/families/), by converting and comparing."""

from __future__ import annotations

import functools
import sys
import warnings

import torch

from clear_surgery.surgery import ClearConfig, analyze, apply_clear, example_inputs, load_builtin, remove_clear

T, GRID = 7, (3, 5)  # text tokens and image grid of the example call (as analysis uses)
VALID = 5  # the families with text padding masks: the example prompt is padded after this many tokens


def _padding(dtype=torch.bool):
    return (torch.arange(T) < VALID)[None].to(dtype)


def _randn(*shape):
    return torch.randn(*shape)


def _ids(columns, values):
    ids = torch.zeros(GRID[0] * GRID[1], columns)
    index = torch.arange(GRID[0] * GRID[1])
    for column, value in values.items():
        ids[:, column] = value(index)
    return ids


def _flux2():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                    timestep_guidance_channels=32)
    img = _ids(4, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img[None], txt_ids=torch.zeros(1, T, 4),
                       guidance=torch.tensor([3.5]), return_dict=False)


def _chroma():
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6),
                                     approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    img = _ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    # ChromaPipeline always passes the text padding mask (as a joint text+image mask, float 0/1)
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img, txt_ids=torch.zeros(T, 3),
                       attention_mask=torch.cat([_padding(torch.float32), torch.ones(1, 15)], 1), return_dict=False)


def _qwenimage():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=32, in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32),
                       encoder_hidden_states_mask=_padding(torch.float32), timestep=torch.tensor([0.5]),
                       img_shapes=[[(1, *GRID)]], return_dict=False)


def _qwenimage_controlnet():
    from diffusers import QwenImageControlNetModel

    model = QwenImageControlNetModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=32, in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    model, inputs = model, _qwenimage()[1]
    inputs["controlnet_cond"] = _randn(1, 15, 16)
    return model, inputs


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4],
                                           text_emb_dim=8, num_routed_experts=0, num_activated_experts=1,
                                           axes_dims_rope=(4, 2, 2), max_resolution=(GRID[0] * 2, GRID[1] * 2), llama_layers=[0, 1])
    # Its text stream is the T5 tokens, the last Llama layer's and the block's Llama layer's: 3 * T
    # tokens. No routed experts: the MoE routing calls .numpy(), which torch.export cannot trace
    # (the attention does not depend on it). Image tokens patchified already (the pipeline's 4-D latent
    # is patchified inside and padded to max_resolution unless square).
    ids = _ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})[None]
    return model, dict(hidden_states=_randn(1, 15, 16), hidden_states_masks=torch.ones(1, 15),
                       img_sizes=torch.tensor([GRID]), img_ids=ids, timesteps=torch.tensor([500]),
                       encoder_hidden_states_t5=_randn(1, T, 8), encoder_hidden_states_llama3=_randn(2, 1, T, 4),
                       pooled_embeds=_randn(1, 8), return_dict=False), 3 * T


def _flux_like(class_name):
    """FLUX-style models (packed tokens, img_ids/txt_ids): Bria, LongCat-Image, Ovis-Image."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6), pooled_projection_dim=32,
                  out_channels=16)
    model = cls(**{k: v for k, v in config.items() if k in accepted})
    img = _ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    inputs = dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32), timestep=torch.tensor([0.5]),
                  img_ids=img, txt_ids=torch.zeros(T, 3), return_dict=False)
    if "pooled_projections" in inspect.signature(cls.forward).parameters:
        inputs["pooled_projections"] = _randn(1, 32)
    return model, inputs


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                       time_embed_dim=16, condition_dim=8, in_channels=4, out_channels=4,
                                       rope_axes_dim=(8, 8))
    size = torch.tensor([[GRID[0] * 16, GRID[1] * 16]])
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([500]), original_size=size, target_size=size,
                       crop_coords=torch.zeros(1, 2), return_dict=False)


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                       pos_embed_max_size=64)
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([500.0]), return_dict=False)


def _flux3():
    from diffusers import Flux3Transformer2DModel

    model = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))
    img = _ids(4, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img, txt_ids=torch.zeros(T, 4), return_dict=False)


def _hunyuanimage():
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=32,
                                           rope_axes_dim=(8, 8))
    return model, dict(hidden_states=_randn(1, 4, *GRID), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=_randn(1, T, 32), encoder_attention_mask=_padding(), return_dict=False)


def _cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, out_channels=4, text_embed_dim=32, time_embed_dim=16,
                                           condition_dim=8, pos_embed_max_size=32, sample_size=16)
    size = torch.tensor([[GRID[0] * 16, GRID[1] * 16]])
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([500]), original_size=size, target_size=size,
                       crop_coords=torch.zeros(1, 2), return_dict=False)


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=32)
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(1, T, 32),
                       encoder_attention_mask=torch.ones(1, T, dtype=torch.bool), return_dict=False)


def _zimage():
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64])
    return model, dict(x=[_randn(4, 1, GRID[0] * 2, GRID[1] * 2)], t=torch.tensor([0.5]), cap_feats=[_randn(T, 32)],
                       return_dict=False)


def _ernie_image():
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=64,
                                         in_channels=4, out_channels=4, text_in_dim=32, rope_axes_dim=(4, 6, 6))
    return model, dict(hidden_states=_randn(1, 4, *GRID), timestep=torch.tensor([0.5]), text_bth=_randn(1, T, 32),
                       text_lens=torch.tensor([VALID]), return_dict=False)


def _krea2():
    from diffusers import Krea2Transformer2DModel

    model = Krea2Transformer2DModel(in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64, timestep_embed_dim=32,
                                    text_hidden_dim=32, num_text_layers=2, text_num_attention_heads=2,
                                    text_num_key_value_heads=2, text_intermediate_size=64,
                                    num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    positions = torch.zeros(T + GRID[0] * GRID[1], 3)  # text tokens first, then the image grid
    index = torch.arange(GRID[0] * GRID[1])
    positions[T:, 1], positions[T:, 2] = index // GRID[1], index % GRID[1]
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 2, 32),
                       timestep=torch.tensor([0.5]), position_ids=positions, encoder_attention_mask=_padding(),
                       return_dict=False)


def _prx():
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=1, axes_dim=[8, 8])
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(1, T, 32), return_dict=False)


def _nucleus_moe():
    from diffusers import NucleusMoEImageTransformer2DModel

    # MoE off: expert routing does not touch attention
    model = NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                                              moe_enabled=False)
    return model, dict(hidden_states=_randn(1, 15, 16), img_shapes=[(1, *GRID)], encoder_hidden_states=_randn(1, T, 32),
                       encoder_hidden_states_mask=torch.ones(1, T), timestep=torch.tensor([0.5]), return_dict=False)


def _bria_fibo():
    from diffusers import BriaFiboTransformer2DModel

    model = BriaFiboTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
                                       text_encoder_dim=32)
    img = _ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=_randn(1, 15, 16), encoder_hidden_states=_randn(1, T, 32),
                       text_encoder_layers=[_randn(1, T, 32)] * 2, timestep=torch.tensor([0.5]), img_ids=img,
                       txt_ids=torch.zeros(T, 3), return_dict=False)


def _sana():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                   cross_attention_dim=32, caption_channels=32, sample_size=16)
    return model, dict(hidden_states=_randn(1, 4, *GRID), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([500]), return_dict=False)


def _qwenimage21():
    from diffusers import QwenImage21Transformer2DModel

    model = QwenImage21Transformer2DModel(in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6))
    # image latents fill 2x2-token slots placed after the text in the vision-language sequence: an even grid
    height, width = 4, 6
    slots = height * width // 4
    img_mask = torch.cat([torch.zeros(1, T, dtype=torch.bool), torch.ones(1, slots, dtype=torch.bool)], 1)
    return model, dict(hidden_states=_randn(1, height * width, 16), encoder_hidden_states=_randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_shapes=[[(1, height, width)]], img_mask=img_mask,
                       return_dict=False), T, height * width


def _glm_image():
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
                                       prior_vq_quantizer_codebook_size=32)
    size = torch.tensor([[GRID[0] * 16.0, GRID[1] * 16.0]])
    tokens = GRID[0] * GRID[1]
    return model, dict(hidden_states=_randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=_randn(1, T, 32),
                       prior_token_id=torch.zeros(1, tokens, dtype=torch.long),
                       prior_token_drop=torch.zeros(1, tokens, dtype=torch.bool), timestep=torch.tensor([500]),
                       target_size=size, crop_coords=torch.zeros(1, 2), return_dict=False)


def _ideogram4():
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        intermediate_size=64, adaln_dim=16, llm_features_dim=32, mrope_section=(4, 2, 2))
    # one packed sequence: text tokens (indicator 3), then the image grid (indicator 2, offset positions)
    length, index = T + GRID[0] * GRID[1], torch.arange(GRID[0] * GRID[1])
    positions = torch.zeros(1, length, 3, dtype=torch.long)
    positions[0, :T, 0] = torch.arange(T)
    positions[0, T:, 1], positions[0, T:, 2] = index // GRID[1] + 65536, index % GRID[1] + 65536
    indicator = torch.full((1, length), 3, dtype=torch.long)
    indicator[0, T:] = 2
    return model, dict(hidden_states=_randn(1, length, 16), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(1, length, 32), position_ids=positions,
                       segment_ids=torch.zeros(1, length, dtype=torch.long), indicator=indicator, return_dict=False)


def _builtin(name):
    return load_builtin(name), None


FAMILIES = {
    "FLUX.1 (FluxTransformer2DModel)": functools.partial(_builtin, "tiny-flux"),
    "FLUX.1 ControlNet (FluxControlNetModel)": functools.partial(_builtin, "tiny-flux-controlnet"),
    "SD3 (SD3Transformer2DModel)": functools.partial(_builtin, "tiny-sd3"),
    "SD3.5 (SD3Transformer2DModel, dual attention)": functools.partial(_builtin, "tiny-sd35"),
    "SD3 ControlNet (SD3ControlNetModel)": functools.partial(_builtin, "tiny-sd3-controlnet"),
    "FLUX.2 (Flux2Transformer2DModel)": _flux2,
    "Chroma (ChromaTransformer2DModel)": _chroma,
    "QwenImage (QwenImageTransformer2DModel)": _qwenimage,
    "QwenImage ControlNet (QwenImageControlNetModel)": _qwenimage_controlnet,
    "QwenImage 2.1 (QwenImage21Transformer2DModel)": _qwenimage21,
    "HiDream (HiDreamImageTransformer2DModel, no routed experts)": _hidream,
    "Bria (BriaTransformer2DModel)": functools.partial(_flux_like, "BriaTransformer2DModel"),
    "LongCat-Image (LongCatImageTransformer2DModel)": functools.partial(_flux_like, "LongCatImageTransformer2DModel"),
    "Ovis-Image (OvisImageTransformer2DModel)": functools.partial(_flux_like, "OvisImageTransformer2DModel"),
    "CogView4 (CogView4Transformer2DModel)": _cogview4,
    "CogView3-Plus (CogView3PlusTransformer2DModel)": _cogview3plus,
    "FLUX.3 (Flux3Transformer2DModel)": _flux3,
    "HunyuanImage (HunyuanImageTransformer2DModel)": _hunyuanimage,
    "AuraFlow (AuraFlowTransformer2DModel)": _auraflow,
    "Ernie-Image (ErnieImageTransformer2DModel)": _ernie_image,
    "Lumina2 (Lumina2Transformer2DModel)": _lumina2,
    "Z-Image (ZImageTransformer2DModel)": _zimage,
    "Krea2 (Krea2Transformer2DModel)": _krea2,
    "Bria FIBO (BriaFiboTransformer2DModel)": _bria_fibo,
    "PRX (PRXTransformer2DModel)": _prx,
    "NucleusMoE-Image (NucleusMoEImageTransformer2DModel, MoE off)": _nucleus_moe,
    "GLM-Image (GlmImageTransformer2DModel)": _glm_image,
    "Ideogram 4 (Ideogram4Transformer2DModel)": _ideogram4,
    "Sana (SanaTransformer2DModel)": _sana,
}


def _rewrite_check(model, inputs, report) -> str:
    """'yes' when the rewrite (with its re-trace check) succeeds and, with a radius covering the
    grid, the converted model's output equals the original's; else the reason."""
    inputs = inputs if inputs is not None else example_inputs(model)

    def output():
        with torch.no_grad():
            out = model(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        return out if isinstance(out, torch.Tensor) else torch.cat([t.flatten() for t in out])

    expected = output()
    try:
        apply_clear(model, ClearConfig(radius=1000), analysis=report)
    except Exception as err:
        return f"no: rewrite failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
    try:
        got = output()
    finally:
        remove_clear(model)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return f"no: converted output differs from the original (max abs diff {(got - expected).abs().max():.2e})"
    return "yes"


def coverage_rows(progress: bool = False) -> list[dict]:
    """One row per family; ``progress``: a bar on stderr, one step per family."""
    from tqdm.auto import tqdm

    rows = []
    for family, build in tqdm(FAMILIES.items(), desc="coverage", unit="family", disable=not progress,
                              file=sys.stderr):
        row = {"family": family}
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. zero-size layers of the tiny configs
                torch.manual_seed(0)
                model, inputs, *tokens = build()  # optionally (text tokens, image tokens) of the example call
            model.eval()
            defaults = (T, GRID[0] * GRID[1])
            text, image = (*tokens, *defaults[len(tokens):])
            report = analyze(model) if inputs is None else analyze(model, inputs, text_tokens=text, image_tokens=image)
        except Exception as err:  # reported, never hidden
            row.update(sites="-", layout="-", rewrite=f"no: analysis failed: {type(err).__name__}: "
                                                      f"{str(err).splitlines()[0][:90]}")
            rows.append(row)
            continue
        kinds = {}
        for site in report.sites:
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
        orders = sorted({s.order for s in report.joint_sites})
        reasons = sorted({s.reason for s in report.sites if s.kind == "joint" and not s.supported})
        row["sites"] = (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none") + (
            "" if report.method == "torch.export" else f" (analyzed at {report.method})")
        row["layout"] = ", ".join(orders) or "-"
        if report.joint_sites and not reasons:
            row["rewrite"] = _rewrite_check(model, inputs, report)
        elif reasons:
            row["rewrite"] = "no: " + "; ".join(reasons)
        else:
            others = sorted({s.reason for s in report.sites if s.kind in ("other", "cross") and s.reason})
            row["rewrite"] = "no: no joint text-image attention" + (f" ({'; '.join(others)})" if others else "")
        rows.append(row)
    return rows


def coverage_table(rows=None, progress: bool = False) -> str:
    rows = rows or coverage_rows(progress)
    lines = ["| family | attention sites (tiny config) | segment order | CLEAR rewrite |", "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['sites']} | {r['layout']} | {r['rewrite']} |" for r in rows]
    return "\n".join(lines)
