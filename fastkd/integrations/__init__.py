"""Integrations of fastkd with training frameworks. Import the submodule you need, e.g.
``from fastkd.integrations.transformers import DistillationTrainer`` (needs ``transformers``)."""
