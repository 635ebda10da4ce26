"""LPIPS (Zhang et al. 2018) as a frozen loss module, with the weight situation made explicit.

LPIPS has two sets of weights:
- the small linear heads calibrated on human judgements: they ship inside the `lpips` package
  (`lpips/weights/v0.1/<net>.pth`), so they are always there;
- the ImageNet backbone (VGG16, AlexNet or SqueezeNet 1.1): torchvision downloads it into torch.hub's
  cache, `torch.hub.get_dir()/checkpoints/<file>` (`$TORCH_HOME/hub/checkpoints`, by default
  `~/.cache/torch/hub/checkpoints`). Offline, the file must be put there by hand; `load_lpips` checks for it
  before building anything and otherwise raises one UserError line. `pretrained_backbone=False` builds a
  random backbone: the distance is still a metric-like quantity (zero on equal images, symmetric), which is
  what the offline tests need, but it is not perceptual.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmd_dar.checkpoint import hub_offline
from dmd_dar.errors import UserError

NETS = ("vgg", "alex", "squeeze")
# The backbone inputs are downsampled by 16-32 in the deepest LPIPS layers (VGG16: 4 max-pools before relu5_3,
# AlexNet: stride 4 + 2 max-pools, SqueezeNet: stride 2 + 3 max-pools); below 64 px those layers shrink to
# 1-2 pixels (AlexNet's last pool fails outright on 28x28 MNIST), so smaller images are upsampled to 64 px.
MIN_SIZE = 64


def _torchvision_weights(net: str):
    from torchvision import models

    # What `lpips` asks torchvision for (`tv.vgg16(pretrained=True)` etc. = the IMAGENET1K_V1 weights).
    return {"vgg": models.VGG16_Weights, "alex": models.AlexNet_Weights,
            "squeeze": models.SqueezeNet1_1_Weights}[net].IMAGENET1K_V1


def backbone_weights_file(net: str) -> Path:
    """Where torchvision looks for (and downloads) the ImageNet backbone of LPIPS `net`."""
    _check_net(net)
    url = _torchvision_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _check_net(net: str) -> None:
    if net not in NETS:
        raise UserError(f"LPIPS net={net!r} is unknown; use one of {', '.join(NETS)}")


def _missing_backbone_message(net: str, reason: str) -> str:
    path = backbone_weights_file(net)
    return (f"LPIPS backbone weights {path.name} not found in {path.parent} ({reason}); download "
            f"{_torchvision_weights(net).url} into that folder (or point TORCH_HOME at a cache that has it), or set "
            "regression.pretrained_backbone=false for a random backbone (tests only)")


def _linear_heads_file(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def load_lpips(net: str = "vgg", pretrained_backbone: bool = True, device: torch.device | str = "cpu") -> LPIPSLoss:
    """LPIPS v0.1 with the calibrated linear heads; the backbone from torchvision's cache (or random)."""
    _check_net(net)
    import lpips

    if pretrained_backbone and not backbone_weights_file(net).is_file():
        if hub_offline():
            raise UserError(_missing_backbone_message(net, "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), no download attempted"))
    heads_file = _linear_heads_file(net)
    if not heads_file.is_file():
        raise UserError(f"the lpips package has no {heads_file}; reinstall it (pip install lpips==0.1.4)")
    try:
        # pretrained=False: lpips would load its heads with strict=False (silently skipping a mismatch); we load
        # them below and check. pnet_rand=True skips torchvision's download for a random backbone.
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=not pretrained_backbone, verbose=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a truncated download a RuntimeError
        if not pretrained_backbone:
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(_missing_backbone_message(net, f"download failed: {reason}")) from None
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    result = model.load_state_dict(heads, strict=False)
    not_loaded = [k for k in heads if k in result.unexpected_keys]
    uncovered = [k for k in result.missing_keys if re.match(r"lin\d+\.", k)]  # `lins.*` aliases the same modules
    if not_loaded or uncovered:
        raise UserError(f"LPIPS linear heads in {heads_file} do not fit the {net} model (unused {not_loaded[:3]}, "
                        f"missing {uncovered[:3]}); reinstall lpips==0.1.4")
    return LPIPSLoss(model).to(device)


class LPIPSLoss(nn.Module):
    """Frozen LPIPS distance between two image batches (float NCHW in [-1, 1], 1 or 3 channels).

    `forward(a, b)` returns the mean distance (a scalar); `reduction="none"` the per-sample distances [N].
    Gradients flow into the inputs, never into the metric. The metric runs in fp32 with autocast off: it is
    small next to the models it scores, and its feature normalisation divides by norms that bf16 rounds badly.
    """

    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        self.metric.eval()  # the linear heads have dropout layers: never active
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4:
            raise ValueError(f"LPIPS needs two NCHW batches of the same shape, got {list(a.shape)} and {list(b.shape)}")
        if a.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {a.shape[1]} channels")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r}; use 'mean' or 'none'")
        with torch.autocast(a.device.type, enabled=False):
            a, b = self._prepare(a), self._prepare(b)
            distances = self.metric(a, b).reshape(a.shape[0])
        return distances.mean() if reduction == "mean" else distances

    @staticmethod
    def _prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIZE:
            scale = MIN_SIZE / min(h, w)
            x = F.interpolate(x, size=(max(MIN_SIZE, round(h * scale)), max(MIN_SIZE, round(w * scale))),
                              mode="bilinear", align_corners=False)
        return x
