"""Tools built on the surgery core and the checkpoint formats: convert, generate, profile, bench,
coverage and distillation. Nothing below (the core, plugins/, hub/) imports from here."""
