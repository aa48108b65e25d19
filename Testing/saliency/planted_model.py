"""A constructed model whose feature taps hold a planted answer, and a phantom it can see.

``PlantedModel`` segments what the bone window shows above mid-grey ("bright") or the rest of
the image ("dark"). Its taps are built so the right saliency is known:

* ``shallow`` (16×16): the target is a faint extra direction on a large shared background, plus
  fixed noise — it barely stands out;
* ``deep`` (8×8): target cells point along ``u``, the rest along ``v`` — it stands out cleanly;
* ``joint`` (8×8): like ``deep`` and the only tap ``project_to_joint`` maps into the text space, where
  ``u`` lands on the "bright" prompt and ``v`` on the "dark" one.

Everything is pointwise or average pooling on a grid that divides the image, so the features of a
flipped image are the flipped features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel
from TextSegmentLib.volume import Volume

PROMPTS = {"bright": 0, "dark": 1}
TEXT_DIM = 4
CHANNELS = 6


@dataclass
class Config:
    image_size: int = 32


class PlantedModel(TextSegmentationModel):
    tap_names = ("shallow", "deep", "joint")

    def __init__(self, *, with_text_embedding: bool = True) -> None:
        super().__init__()
        self.config = Config()
        self.scale = nn.Parameter(torch.tensor(40.0))
        basis = torch.eye(CHANNELS)
        self.register_buffer("u", basis[0])
        self.register_buffer("v", basis[1])
        self.register_buffer("background", basis[2] * 4.0)
        noise = torch.randn(CHANNELS, 16, 16, generator=torch.Generator().manual_seed(7)) * 0.3
        self.register_buffer("noise", noise)
        projection = torch.zeros(TEXT_DIM, CHANNELS)
        projection[0, 0] = projection[1, 1] = 1.0  # u → "bright", v → "dark"
        projection[2, 2:] = 0.1
        self.register_buffer("projection", projection)
        self.with_text_embedding = with_text_embedding
        self.forward_calls = 0

    def encode_text(self, prompts, aux_prompts=None):
        ids = torch.tensor([PROMPTS[p] for p in prompts])
        return TextFeatures(pooled=F.one_hot(ids, TEXT_DIM).float())

    def forward(self, images, text, *, taps=None):
        self.forward_calls += 1
        bone = images[:, 2:3]
        sign = text.pooled[:, :1, None, None] * 2 - 1  # +1 bright, -1 dark
        logits = self.scale * sign * (bone - 0.5)
        inside = (bone > 0.5).float()
        names = self.resolve_taps(taps)
        out = {}
        for name in names:
            if name == "shallow":
                p = F.adaptive_avg_pool2d(inside, 16)
                out[name] = self.background[None, :, None, None] + 0.5 * p * self.u[None, :, None, None] + self.noise
            else:
                p = F.adaptive_avg_pool2d(inside, 8)
                out[name] = p * self.u[None, :, None, None] + (1 - p) * self.v[None, :, None, None]
        return ModelOutput(
            logits=logits,
            taps=out,
            text_embedding=text.pooled if self.with_text_embedding else None,
            image_embedding=None,
        )

    joint_tap_names = ("joint",)

    def project_to_joint(self, name, features):
        assert name in self.joint_tap_names, "the sink must only ask for joint taps"
        return torch.einsum("dc,nchw->ndhw", self.projection, features)


def sphere_phantom(direction=np.eye(3), *, shape=(8, 32, 32), centre_offset=(6.0, -3.0, 0.0), radius=6.0):
    """Air around a soft-tissue body holding one bright ball, placed in physical space (any storage order agrees).

    Returns the volume, the ball mask on its grid and the ball centre in LPS mm.
    """
    volume = Volume(np.zeros(shape, np.int16), spacing=(1.0, 1.0, 2.0), direction=direction)
    z, y, x = np.indices(shape)
    points = volume.physical_points(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)).reshape(*shape, 3)
    middle = points.reshape(-1, 3).mean(axis=0)
    centre = middle + np.asarray(centre_offset)
    ball = np.linalg.norm(points - centre, axis=-1) < radius
    body = np.linalg.norm((points - middle)[..., :2], axis=-1) < 14.0
    hu = np.where(ball, 1200, np.where(body, 40, -1000)).astype(np.int16)
    return volume.with_array(hu), ball, centre
