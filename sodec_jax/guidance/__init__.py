"""Fidelity guidance: the frozen feature extractor F (vit.py: ViT, swin.py: Swin) and F_p."""
