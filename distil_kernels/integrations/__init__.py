"""Drop-in integrations with other libraries (optional dependencies, imported lazily)."""

from .transformers import patch_model

__all__ = ["patch_model"]
