"""Loaders for pretrained weights (diffusers model folders)."""
