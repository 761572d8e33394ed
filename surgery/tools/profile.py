"""Attention-locality profile: how much of each image query's attention mass (dense, during real
denoising steps) falls inside its CLEAR window, per layer, head and radius; and the smallest
radius that keeps a chosen share. Queries are sampled, so it scales to large images."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from clear_surgery.plugins.layout import TokenLayout, with_text_queries
from clear_surgery.surgery import observe_attention


@dataclass
class LocalityProfiler:
    """A step of the attention route (``observe_attention``): sees q, k, v of each call, answers it densely."""

    radii: list[float]
    queries_per_call: int = 256
    seed: int = 0
    # site -> running sums, per head: text mass, window mass per radius; and the number of queries
    text_mass: dict = field(default_factory=dict)
    window_mass: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # site -> (grid, query positions, attention maps)
    # calls with several images (a reference image): mass of the image keys each rule for the other
    # images keeps: site -> rule -> per head and radius
    cross_mass: dict = field(default_factory=dict)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, call, proceed):
        query = call.query
        if query.shape[1] != call.key.shape[1]:  # the image's queries alone: text rows (never sampled) as zeros
            query = with_text_queries(query, call.text_len, call.text_first)[0]
        self.observe(call.site, query, call.key, TokenLayout(call.text_len, call.text_first, call.height,
                                                             call.width, images=tuple(call.images)))
        out = F.scaled_dot_product_attention(call.query.transpose(1, 2), call.key.transpose(1, 2),
                                             call.value.transpose(1, 2), attn_mask=call.attn_mask, scale=call.scale)
        return out.transpose(1, 2)

    @torch.no_grad()
    def observe(self, site: str, query: torch.Tensor, key: torch.Tensor, layout: TokenLayout) -> None:
        """query/key: (batch, tokens, heads, dim), tokens in the layout's order (raster image tokens)."""
        image = layout.image_tokens
        picks = torch.randperm(image, generator=self.generator)[: self.queries_per_call].to(query.device)
        is_image, y, x = layout.positions(query.device)
        rows = layout.image_start + picks
        q = query[:, rows].float()  # (batch, picks, heads, dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, key.float()) / math.sqrt(query.shape[-1])
        probs = scores.softmax(-1)  # (batch, heads, picks, tokens)
        text = probs[..., ~is_image].sum(-1)  # (batch, heads, picks)
        d2 = (y[rows][:, None] - y[None, :]) ** 2 + (x[rows][:, None] - x[None, :]) ** 2  # (picks, tokens)
        windows = torch.stack([(probs * ((d2 < r * r) & is_image[None, :])).sum(-1) for r in self.radii], -1)
        if layout.images:
            self._observe_cross(site, probs, d2, is_image, rows, layout)
        self.text_mass[site] = self.text_mass.get(site, 0) + text.sum((0, 2)).cpu().double()
        self.window_mass[site] = self.window_mass.get(site, 0) + windows.sum((0, 2)).cpu().double()
        self.count[site] = self.count.get(site, 0) + text.shape[0] * text.shape[2]
        if site not in self.examples:
            first = slice(layout.image_start, layout.image_start + layout.height * layout.width)  # the first image
            maps = probs[0, :, :4][..., first].mean(0).reshape(-1, layout.height, layout.width)
            self.examples[site] = ((layout.height, layout.width), [(int(y[r]), int(x[r])) for r in rows[:4]],
                                   maps.cpu())

    def _observe_cross(self, site, probs, d2, is_image, rows, layout) -> None:
        """What a query of one image keeps of the others under each rule: its window at the same place in
        every image (CLEAR's rule), only its own image's window, or its window and every other image."""
        sizes = torch.tensor([h * w for h, w in layout.grids], device=d2.device)
        index = (torch.arange(layout.seq_len, device=d2.device) - layout.image_start).clamp(0, layout.image_tokens - 1)
        segment = torch.bucketize(index, sizes.cumsum(0), right=True)
        own = segment[rows][:, None] == segment[None, :]
        rules = {"window in every image": lambda near: near,
                 "own image only": lambda near: near & own,
                 "window and all of the other images": lambda near: (near & own) | ~own}
        sums = self.cross_mass.setdefault(site, {})
        for rule, keys in rules.items():
            kept = torch.stack([(probs * (keys(d2 < r * r) & is_image[None, :])).sum(-1) for r in self.radii], -1)
            sums[rule] = sums.get(rule, 0) + kept.sum((0, 2)).cpu().double()

    def results(self, keep: float = 0.95) -> dict:
        sites = list(self.count)
        text = {s: (self.text_mass[s] / self.count[s]).tolist() for s in sites}  # [head]
        window = {s: (self.window_mass[s] / self.count[s]).tolist() for s in sites}  # [head][radius]

        def smallest(kept_by_radius):
            return next((r for r, kept in zip(self.radii, kept_by_radius) if kept >= keep), None)

        per_layer = {}
        for s in sites:
            heads = len(text[s])
            kept = [sum(text[s][h] + window[s][h][i] for h in range(heads)) / heads for i in range(len(self.radii))]
            per_layer[s] = smallest(kept)
        overall = [sum(sum(text[s][h] + window[s][h][i] for h in range(len(text[s]))) / len(text[s]) for s in sites)
                   / len(sites) for i in range(len(self.radii))]
        found = {"radii": self.radii, "keep": keep, "queries": self.count, "text_share": text,
                 "window_share": window, "kept_share_mean": overall, "recommended_radius": smallest(overall),
                 "recommended_radius_per_layer": per_layer}
        if self.cross_mass:  # mean over sites and heads of text + image mass kept, per rule and radius
            rules = next(iter(self.cross_mass.values()))
            found["several_images_kept_share_mean"] = {
                rule: [sum((self.text_mass[s] + self.cross_mass[s][rule][:, i]).mean().item() / self.count[s]
                           for s in self.cross_mass) / len(self.cross_mass) for i in range(len(self.radii))]
                for rule in rules}
        return found


def plot_profile(results: dict, examples: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites, radii = list(results["window_share"]), results["radii"]
    fig, axes = plt.subplots(1, len(radii), figsize=(3.2 * len(radii), 0.3 * len(sites) + 2), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[0], radii)):
        grid = [[results["text_share"][s][h] + results["window_share"][s][h][i]
                 for h in range(len(results["text_share"][s]))] for s in sites]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(title=f"r = {r:g}", xlabel="head", xticks=range(len(grid[0])), yticks=range(len(sites)),
               yticklabels=sites if i == 0 else [])
    fig.colorbar(image, ax=axes[0].tolist(), label="attention mass kept (text + window)")
    heatmap = folder / "locality_heatmap.png"
    fig.savefig(heatmap, dpi=100, bbox_inches="tight")
    plt.close(fig)

    shown = [sites[0], sites[len(sites) // 2], sites[-1]]
    fig, axes = plt.subplots(len(shown), 4, figsize=(10, 2.6 * len(shown)), squeeze=False)
    for row, site in zip(axes, shown):
        (height, width), queries, maps = examples[site]
        for ax, (y, x), amap in zip(row, queries, maps):
            ax.imshow(amap, cmap="magma")
            ax.plot([x], [y], marker="x", color="cyan")
            ax.set(title=f"{site.split('.attn')[0]} q=({y},{x})", xticks=[], yticks=[])
            ax.title.set_fontsize(7)
    maps_png = folder / "attention_maps.png"
    fig.savefig(maps_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [heatmap, maps_png]


def profile_pipeline(pipe, prompt: str, height: int, width: int, steps: int, radii, *, keep=0.95,
                     queries_per_call=256, seed=0, out: Path | None = None, image_attention: str = "dense",
                     **call_kwargs) -> dict:
    """Run ``pipe`` with dense attention while the profiler watches every joint attention site (and with
    ``image_attention='local'`` every image-only self-attention site: no text, the window share alone)."""
    profiler = LocalityProfiler(list(radii), queries_per_call, seed)
    with observe_attention(pipe.transformer, profiler, image_attention=image_attention):
        pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(seed), output_type="latent", **call_kwargs)
    results = profiler.results(keep)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "locality.json").write_text(json.dumps(results, indent=1) + "\n")
        plot_profile(results, profiler.examples, out)
    return results
