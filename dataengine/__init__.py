"""dataengine: a semi-supervised data engine for computer vision.

General ground truth + unlabelled scenario images -> teacher -> calibrated pseudo-labels -> human review ->
class rebalancing and hard-negative mining -> small mobile students (detection + semantic segmentation).
"""

__version__ = "0.1.0"
