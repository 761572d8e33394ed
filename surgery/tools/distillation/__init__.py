"""Distillation: heal a CLEAR model against its dense teacher on samples the teacher generated."""

from .data import RandomSamples, SampleCache, generate_samples
from .recipe import DistillRecipe, RecipeError, load_recipe, parse_recipe
from .trainer import DistillError, Distiller, distill

__all__ = ["DistillError", "DistillRecipe", "Distiller", "RandomSamples", "RecipeError", "SampleCache", "distill",
           "generate_samples", "load_recipe", "parse_recipe"]
