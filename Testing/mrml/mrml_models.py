"""A per-pixel fake model for the MRML tests: its right answer is known exactly, in any geometry."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel

SIGN = {"bone": 1.0, "soft tissue": -1.0}  # which side of mid-grey in the bone window (400 HU) a prompt takes


@dataclass
class Config:
    image_size: int = 32


class BoneModel(TextSegmentationModel):
    """'bone' is HU above 400 (mid-grey of the bone window), 'soft tissue' the rest; records its threads.

    ``gate`` (an Event) holds every forward pass until set, so a test can act while a job runs.
    ``image_size`` at the series' matrix makes fitting a slice to the model grid the identity.
    """

    tap_names = ("pixels",)

    def __init__(self, gate: threading.Event | None = None, *, image_size: int = 32) -> None:
        super().__init__()
        self.config = Config(image_size)
        self.scale = nn.Parameter(torch.tensor(40.0))
        self.gate = gate
        self.started = threading.Event()
        self.threads: list[str] = []

    def encode_text(self, prompts, aux_prompts=None):
        return TextFeatures(pooled=torch.tensor([[SIGN[p]] for p in prompts]))

    def forward(self, images, text, *, taps=None):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        logits = self.scale * text.pooled[:, :1, None, None] * (images[:, 2:3] - 0.5)
        return ModelOutput(logits=logits, taps={"pixels": images} if taps else {})
