"""Mask R-CNN R50-FPN as the MABN paper trains it, from detectron2's own LazyConfig with the norm swapped.

The paper's architecture (Yan et al. 2020, Sec. 5.2): the norm in the ResNet stem and stages, the FPN, a
4-conv + 1-fc box head and the mask head's convs; the RPN head unnormalised; convs feeding MABN
weight-centred. detectron2's ``common/models/mask_rcnn_fpn.py`` is loaded and edited, not copied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from mabn.norms import NormRecipe, center_conv_weights

from .checkpoint import load_backbone_weights
from .norms import freeze_frozen_blocks

logger = logging.getLogger(__name__)

# torchvision's ImageNet input statistics (RGB, 0-255): what train_imagenet.py's ResNets are trained with
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


def mask_rcnn_lazy_config(norm, *, num_classes: int, depth: int = 50, freeze_at: int = 0,
                          box_head_convs: int = 4, box_head_fcs: int = 1, mask_head_convs: int = 4,
                          norm_fpn: bool = True, norm_heads: bool = True, stride_in_1x1: bool = False,
                          input_format: str = "RGB", pixel_mean: Sequence[float] = TORCHVISION_PIXEL_MEAN,
                          pixel_std: Sequence[float] = TORCHVISION_PIXEL_STD,
                          anchor_sizes: Sequence[int] | None = None, rois_per_image: int = 512,
                          proposals_per_image: Sequence[int] = (1000, 1000), detections_per_image: int = 100):
    """detectron2's Mask R-CNN FPN LazyConfig with ``norm`` (a constructor or a detectron2 norm name) placed
    where the paper puts it. ``stride_in_1x1=False`` is torchvision's layout (train_imagenet.py
    checkpoints); detectron2's MSRA R-50.pkl needs True with BGR input and its pixel statistics.
    ``rois_per_image`` (512), ``proposals_per_image`` (RPN proposals kept, training / inference) and
    ``detections_per_image`` (100) are detectron2's defaults; small images with few objects need far fewer."""
    from detectron2 import model_zoo

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.norm = norm
    bottom_up.stages.norm = norm
    bottom_up.stages.depth = depth
    if depth >= 50:
        bottom_up.stages.stride_in_1x1 = stride_in_1x1
    else:  # BasicBlock ResNets have no 1x1 conv to put the stride in
        bottom_up.stages.pop("stride_in_1x1")
    bottom_up.freeze_at = freeze_at
    model.backbone.norm = norm if norm_fpn else ""
    heads = model.roi_heads
    heads.num_classes = num_classes
    heads.box_head.conv_dims = [256] * box_head_convs
    heads.box_head.fc_dims = [1024] * box_head_fcs
    heads.box_head.conv_norm = norm if norm_heads else ""
    # conv_dims: the convs, then the deconv's width (detectron2's MaskRCNNConvUpsampleHead convention)
    heads.mask_head.conv_dims = [256] * (mask_head_convs + 1)
    heads.mask_head.conv_norm = norm if norm_heads else ""
    heads.batch_size_per_image = rois_per_image  # RoIs sampled per image for the heads' losses
    model.proposal_generator.post_nms_topk = tuple(proposals_per_image)  # (training, inference)
    heads.box_predictor.test_topk_per_image = detections_per_image
    if anchor_sizes is not None:
        model.proposal_generator.anchor_generator.sizes = [[s] for s in anchor_sizes]
    model.input_format = input_format
    model.pixel_mean = list(pixel_mean)
    model.pixel_std = list(pixel_std)
    return model


def build_mask_rcnn(recipe: NormRecipe, *, weights: str | None = None, **options) -> nn.Module:
    """Instantiate Mask R-CNN with the recipe's norm, centre the convs feeding MABN, load ImageNet weights,
    then freeze the norms of frozen blocks (in that order: a frozen copy takes the loaded statistics).

    A frozen norm has no business in randomly initialised layers: with ``frozenbn`` (detectron2's
    fine-tuning default) only the backbone gets it and the FPN and heads stay unnormalised.
    """
    from detectron2.config import instantiate

    if recipe.name == "frozenbn":
        options = {**options, "norm_fpn": False, "norm_heads": False}
    model = instantiate(mask_rcnn_lazy_config(recipe.ctor, **options))
    if recipe.weight_centering:
        centred = center_conv_weights(model)
        logger.info("weight centring on %d convs feeding %s", len(centred), recipe.name)
    if weights:
        load_backbone_weights(model, weights)
    frozen = freeze_frozen_blocks(model)
    if frozen:
        logger.info("%d batch-dependent norms in frozen blocks became FrozenBatchNorm2d", len(frozen))
    return model
