"""Writes recipes/prompts/self-generated-1k.txt: 1000 varied prompts (subject x setting x style) for
teacher self-generated distillation data. Deterministic: python recipes/prompts/make_prompts.py"""

from itertools import product
from pathlib import Path

SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a vintage sports car", "a snow leopard",
            "a wooden sailboat", "a robot gardener", "a street musician", "a glass teapot", "a mountain village",
            "a hummingbird", "a steam locomotive", "a cathedral interior", "a desert oasis", "a jazz trio",
            "a bonsai tree", "an astronaut", "a koi pond", "a medieval knight", "a neon-lit alley",
            "a field of sunflowers", "a polar bear cub", "a library with tall shelves", "a hot air balloon",
            "a bustling fish market"]
SETTINGS = ["at golden hour", "in heavy rain", "under a starry sky", "on a foggy morning", "in autumn",
            "seen from above", "in winter snow", "at dusk with long shadows"]
STYLES = ["photograph, 35mm, shallow depth of field", "oil painting", "watercolor illustration",
          "highly detailed digital art", "cinematic still"]

prompts = [f"{s} {w}, {st}" for s, w, st in product(SUBJECTS, SETTINGS, STYLES)]
Path(__file__).with_name("self-generated-1k.txt").write_text("\n".join(prompts) + "\n")
