"""Teacher and student models: one multi-task (GFL detection + semantic segmentation) network, chosen by name.

Example:
    >>> from dataengine.models import create_model, list_models
    >>> list_models()
    ['mobilenet_v2_gfl', 'mobilenet_v3_large_gfl', 'mobilenet_v3_small_gfl', 'resnet18_bifpn_gfl', 'resnet50_bifpn_gfl']
    >>> model = create_model("resnet18_bifpn_gfl", num_classes=3)
    >>> create_model(**model.config).config == model.config
    True
"""

from dataengine.models.backbones import PretrainedWeightsMissing, build_backbone, pretrained_path
from dataengine.models.flops import count_gflops, count_params_m
from dataengine.models.fold import fold_batchnorm
from dataengine.models.multitask import MultiTaskDetSeg
from dataengine.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "MultiTaskDetSeg",
    "PretrainedWeightsMissing",
    "build_backbone",
    "count_gflops",
    "count_params_m",
    "create_model",
    "fold_batchnorm",
    "is_model",
    "list_models",
    "pretrained_path",
    "register_model",
]
