"""The C4 ROI head with an extra norm layer after res5, as used for transfer from SSL backbones.

The SSL backbones (MoCo, INTL, ...) are fine-tuned with BN everywhere; the C4 head's res5 output is fed
to the box and mask predictors through one more norm layer (``roi_heads.res5.norm``), which the
pretrained weights do not have and which therefore starts fresh. Registered in detectron2's
``ROI_HEADS_REGISTRY`` when this module is imported (``transfer.detection`` imports it).
"""

from __future__ import annotations

from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

EXTRA_NORM_NAME = "norm"


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads + ``get_norm(cfg.MODEL.RESNETS.NORM)`` appended to the res5 block."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        out_channels = self.res5[-1].out_channels
        self.res5.add_module(EXTRA_NORM_NAME, get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
