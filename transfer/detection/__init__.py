"""Detection transfer: detectron2 Mask R-CNN R50-C4 (extra norm after res5) on COCO, VOC or any COCO-json set.

Importing the package registers ``Res5ROIHeadsExtraNorm`` in detectron2's ROI-head registry, which the
configs under ``configs/detection/`` name. Entry points: ``transfer.detection.train_net.run_task`` /
``python -m transfer.detection.train_net`` (one seed) and ``transfer.detection.aggregate`` (mean +- std).
"""

from transfer.detection import roi_heads as _roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
