"""Gradient-free layer-wise saliency: why the model put the mask where it did, layer by layer.

Maps are cosine similarities between each feature tap of the *segmenting* forward pass and
reference representations of the target (stage 1: organ prototype; 2: + prompt embedding;
3: four components with a spatial prior), so they cost no gradients and no extra forward pass::

    from TextSegmentLib.saliency import explain, save_montage, write_saliency
    run = explain(volume, ["liver"], model=model, stage=2)      # segment + saliency in one pass
    write_saliency(run.features, out_dir="out/saliency")         # one map per layer + legend JSON
    save_montage(run.features[0], volume=volume, mask=run[0].mask, path="out/liver.png")

``grad_cam`` is the gradient baseline and ``metrics`` scores maps against a target mask.
"""

from .config import SaliencyConfig
from .export import write_saliency
from .layer_maps import explain_batch
from .maths import Stage3Weights
from .montage import save_montage
from .sink import COMBINED, PromptSaliency, SaliencyResult, SaliencySink, build_saliency_sink, explain

__all__ = [
    "COMBINED",
    "PromptSaliency",
    "SaliencyConfig",
    "SaliencyResult",
    "SaliencySink",
    "Stage3Weights",
    "build_saliency_sink",
    "explain",
    "explain_batch",
    "save_montage",
    "write_saliency",
]
