"""Model zoo: the architectures of the papers' tables, built with any registered conv type."""

from .registry import available_models, create_model, register_model

__all__ = ["available_models", "create_model", "register_model"]
