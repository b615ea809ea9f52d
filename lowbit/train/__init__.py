"""Training-time compression: what runs in (or next to) the user's training loop. `bn_adaptation.py`: BatchNorm
statistics re-estimated after compression."""

from .bn_adaptation import batch_norm_adaptation

__all__ = ["batch_norm_adaptation"]
