"""Pseudo-labelling: the teacher labels the scenario pool with test-time augmentation (boxes fused across views with
per-box agreement measures, soft segmentation with an uncertainty map), sharded over ``torchrun`` ranks and
resumable chunk by chunk; optionally with the teacher's BatchNorm statistics re-estimated on the images it labels
(:mod:`~dataengine.pseudo.adapt`).

Example:
    >>> from dataengine.pseudo import label_images, tta_views
    >>> [v.size for v in tta_views(128, (1.0, 1.25), hflip=False)]
    [128, 160]
"""

from dataengine.pseudo.adapt import adapt_batchnorm
from dataengine.pseudo.fusion import FusedBoxes, ViewBoxes, fuse_boxes, fuse_boxes_batch
from dataengine.pseudo.label import (
    PREDICTIONS_FILE,
    SEG_SUFFIXES,
    encode_segmentation,
    label_images,
    predict_batch,
    run_fingerprint,
    write_segmentation,
)
from dataengine.pseudo.tta import (
    TTAView,
    flip_image_regions,
    tta_views,
    view_boxes_to_original,
    view_probs_to_original,
)

__all__ = [
    "PREDICTIONS_FILE",
    "SEG_SUFFIXES",
    "FusedBoxes",
    "TTAView",
    "ViewBoxes",
    "adapt_batchnorm",
    "encode_segmentation",
    "flip_image_regions",
    "fuse_boxes",
    "fuse_boxes_batch",
    "label_images",
    "predict_batch",
    "run_fingerprint",
    "tta_views",
    "view_boxes_to_original",
    "view_probs_to_original",
    "write_segmentation",
]
