"""Model sources: registry names, local Hugging Face directories, and the weights behind them."""

from graphopt.models.source import ModelSource, open_model  # noqa: F401
