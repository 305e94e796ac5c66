"""Training losses. Every loss has the trainer's signature ``loss_fn(model, xb, yb) -> scalar``,
or is a factory returning such a callable, so that one trainer serves every chapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---- section: cross-entropy (toolkit) -------------------------------------------------------


def cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of the model's logits (the default training loss)."""
    return F.cross_entropy(model(xb), yb)

# ---- end section: cross-entropy --------------------------------------------------------------

# ---- section: differential training (chapter 4) ---------------------------------------------
# ---- end section: differential training -----------------------------------------------------

# ---- section: angular margin penalty and MMC (chapter 5) -------------------------------------
# ---- end section: angular margin penalty and MMC ---------------------------------------------

# ---- section: average-margin regulariser and Parseval (chapter 6) ----------------------------
# ---- end section: average-margin regulariser and Parseval ------------------------------------
