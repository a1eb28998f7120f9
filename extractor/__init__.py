"""Frozen pretrained backbones run once over images; their embeddings kept in a content-addressed store."""

__version__ = "0.1.0"
