"""Integrations of fastkd with training frameworks. Import the submodule you need, e.g.
``from fastkd.integrations.transformers import KDTrainer`` (needs ``transformers``) or
``from fastkd.integrations.trl import FastKDDistillationTrainer`` (needs ``trl``)."""
