"""Sequence losses written in plain PyTorch (no k2, no torchaudio)."""
