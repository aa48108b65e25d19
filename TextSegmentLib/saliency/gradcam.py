"""Grad-CAM on the same taps and the same target as the gradient-free maps: the baseline they are judged against.

For segmentation the class score becomes the summed logits inside the target (Vinogradova et al.'s
Seg-Grad-CAM): ``y = Σ_{x ∈ target} logit(x)``. Each tap's channels are weighted by the spatial
mean of ``∂y/∂A`` and the weighted sum goes through a ReLU. It needs its own forward pass with
autograd plus a backward pass, which is exactly the cost the gradient-free maps avoid.

A tap can only be explained this way if the logits are computed *from that tensor*; a tap that
is a reshaped copy (e.g. ViT tokens turned into a grid after the fact) has no gradient and gets
``None`` here.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


def grad_cam(
    model: Any,
    images: Any,
    text: Any,
    *,
    layers: Sequence[str],
    target: Optional[Any] = None,
    threshold: float = 0.5,
) -> dict[str, Optional[Any]]:
    """Raw Grad-CAM maps ``{layer: (N, h, w) or None}`` for ``images`` (N, 3, S, S) paired row by row with ``text``.

    ``target`` holds (N, S, S) weights on the model grid; by default each row's own predicted mask
    (probability ≥ ``threshold``), the gradient-free maps' default too.
    """
    import torch

    from ..models.base import TextFeatures

    # inference_mode(False): called inside an inference_mode block, nothing would be recorded and
    # every tap would come back as "not on the path to the logits"
    with torch.inference_mode(False), torch.enable_grad():
        # fresh copies: inputs made under inference_mode (the engine's, the text cache's) cannot enter a graph
        images = images.detach().clone().requires_grad_(True)  # so frozen towers still build a graph
        text = TextFeatures(*(None if t is None else t.clone() for t in (text.pooled, text.tokens, text.mask)))
        output = model(images, text, taps=list(layers))
        logits = output.logits[:, 0].float()
        if target is None:
            target = (torch.sigmoid(logits.detach()) >= threshold).float()
        score = (logits * target.to(logits.device).float().clone()).sum()
        taps = [output.taps[name] for name in layers]
        live = [i for i, tap in enumerate(taps) if tap.requires_grad] if score.requires_grad else []
        found = torch.autograd.grad(score, [taps[i] for i in live], allow_unused=True) if live else ()
        grads: list[Optional[Any]] = [None] * len(taps)
        for i, grad in zip(live, found):
            grads[i] = grad
    maps: dict[str, Optional[Any]] = {}
    for name, tap, grad in zip(layers, taps, grads):
        if grad is None:
            log.info("Grad-CAM: tap %s is not on the path to the logits; no map", name)
            maps[name] = None
            continue
        channel_weights = grad.float().mean(dim=(2, 3))
        cam = torch.einsum("nc,nchw->nhw", channel_weights, tap.detach().float())
        maps[name] = torch.relu(cam)
    return maps
