"""dataengine: a semi-supervised data engine for computer vision.

General ground truth + unlabelled scenario images -> teacher -> calibrated pseudo-labels -> human review ->
class rebalancing and hard-negative mining -> small mobile students (detection + semantic segmentation).

Using a trained student (``load_student`` is imported lazily, so ``import dataengine`` stays light):

Example:
    >>> import dataengine
    >>> predictor = dataengine.load_student("models/students/mobilenet_v3_small", backend="onnx")  # doctest: +SKIP
    >>> predictor.predict(["photo.jpg"])[0]["boxes"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dataengine.predictor import load_student

__version__ = "0.1.0"
__all__ = ["__version__", "load_student"]


def __getattr__(name: str) -> Any:
    # PEP 562: torch, onnxruntime and the models are imported on first use of load_student, not by `import dataengine`.
    if name == "load_student":
        from dataengine.predictor import load_student

        return load_student
    raise AttributeError(f"module 'dataengine' has no attribute {name!r}")
