"""Built-in rules, one small module per family; importing this package registers them all."""

from cppo_diag.masks.rules import pg_is, grpo_clip, cispo, dppo, cppo, cppo_ablations, trm, drpo  # noqa: F401
