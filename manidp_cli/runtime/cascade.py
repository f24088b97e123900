"""Run an escalation cascade: the narrow network answers every image, the wide one re-answers the
images whose top softmax probability from the narrow one is below ``threshold``
(``manidp eval --escalate-to`` fits the threshold; analysis/cascade.py measures it)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from manidp_cli.io import load_cascade_file


def escalates(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which images (rows of softmax outputs) the narrow network is unsure of: the rule both the
    evaluation (analysis/cascade.py) and ``Cascade`` apply."""
    return probabilities.max(1).values < threshold


class Cascade(nn.Module):
    """Logits of ``narrow``, replaced by ``wide``'s for the images the narrow network is unsure of.

    Each image costs the narrow network, and the wide one too when it escalates: run it with
    batches, as the wide network only sees the escalated images of each.
    """

    def __init__(self, narrow: nn.Module, wide: nn.Module, threshold: float):
        super().__init__()
        self.narrow = narrow
        self.wide = wide
        self.threshold = threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.narrow(images).float()
        unsure = escalates(logits.softmax(1), self.threshold)
        if unsure.any():
            logits[unsure] = self.wide(images[unsure]).float()
        return logits


def load_cascade(path: str | Path) -> Cascade:
    """The cascade a file saved by ``manidp eval --escalate-to ... --save-cascade`` holds, in eval mode."""
    narrow, wide, saved = load_cascade_file(path)
    return Cascade(narrow, wide, saved.threshold).eval()
