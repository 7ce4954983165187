"""Plug-ins that connect cppo-diag to real trainers (see docs/integrations.md).

- ``cppo_diag.integrations.trl``   ``CppoDiagGRPOTrainer`` / ``CppoDiagGRPOMixin`` + ``CppoDiagCallback``
  for TRL's ``GRPOTrainer``: per-token capture of every optimisation step and, optionally, any cppo-diag rule
  in place of TRL's clipping.
- ``cppo_diag.integrations.verl``  registers cppo-diag rules in verl's policy-loss registry
  (``actor_rollout_ref.actor.policy_loss.loss_mode=cppo``), with per-token capture.

Each module imports its trainer package lazily, so ``import cppo_diag.integrations`` never needs TRL or verl.
"""
