"""Mask R-CNN R50-FPN as the MABN paper trains it, from detectron2's own LazyConfig with the norm swapped.

The paper's architecture (Yan et al. 2020, Sec. 5.2): the norm in the ResNet stem and stages, the FPN, a
4-conv + 1-fc box head and the mask head's convs; the RPN head unnormalised; convs feeding MABN
weight-centered. detectron2's ``common/models/mask_rcnn_fpn.py`` is loaded and edited, not copied.

yacs configs reach the same layers through builders registered in detectron2's registries, the extension
point its ``projects/`` use: ``MODEL.BACKBONE.NAME: build_mabn_resnet_fpn_backbone``,
``MODEL.ROI_BOX_HEAD.NAME: build_mabn_box_head``, ``MODEL.ROI_MASK_HEAD.NAME: build_mabn_mask_head``. They
resolve ``RESNETS.NORM``, ``FPN.NORM``, ``ROI_BOX_HEAD.NORM`` and ``ROI_MASK_HEAD.NORM`` (``MABN``, ``brn``,
...; detectron2's own names keep their meaning) with the config's ``MODEL.MABN`` keys (``add_mabn_config``) and hand the
constructors to detectron2's classes. Both routes build the stem, residual blocks and heads as the
subclasses of ``mabn.d2.activations``: detectron2's forward, with one activation per position for norms
that carry their own (EvoNorm-S0, FRN + TLU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from mabn.norms import NormRecipe

from .activations import NormActConvFCHead, NormActMaskHead, NormActStem, block_class, without_activation
from .checkpoint import load_backbone_weights
from .norms import freeze_frozen_blocks, resolve_norm

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
    # detectron2's stem, blocks and heads as subclasses that apply one activation per position when the norm
    # carries its own (mabn.d2.activations); other norms see detectron2's forward
    bottom_up.stem._target_ = NormActStem
    bottom_up.stem.norm = norm
    bottom_up.stages.norm = norm
    bottom_up.stages.depth = depth
    bottom_up.stages.block_class = block_class(depth)
    if depth >= 50:
        bottom_up.stages.stride_in_1x1 = stride_in_1x1
    else:  # BasicBlock ResNets have no 1x1 conv to put the stride in
        bottom_up.stages.pop("stride_in_1x1")
    bottom_up.freeze_at = freeze_at
    model.backbone.norm = without_activation(norm) if norm_fpn else ""  # no activation in the FPN
    heads = model.roi_heads
    heads.box_head._target_ = NormActConvFCHead
    heads.mask_head._target_ = NormActMaskHead
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
    """Instantiate Mask R-CNN with the recipe's norm, center the convs feeding MABN, load ImageNet weights,
    then freeze the norms of frozen blocks (in that order: a frozen copy takes the loaded statistics).

    A frozen norm has no business in randomly initialised layers: with ``frozenbn`` (detectron2's
    fine-tuning default) only the backbone gets it and the FPN and heads stay unnormalised.
    """
    from detectron2.config import instantiate

    if recipe.frozen:
        options = {**options, "norm_fpn": False, "norm_heads": False}
    model = instantiate(mask_rcnn_lazy_config(recipe.ctor, **options))
    recipe.prepare(model)  # the convs feeding the norms paired (MABN: weight centering)
    if weights:
        load_backbone_weights(model, weights)
    frozen = freeze_frozen_blocks(model)
    if frozen:
        logger.info("%d batch-dependent norms in frozen blocks became FrozenBatchNorm2d", len(frozen))
    return model


def _center(module: nn.Module, *recipes: NormRecipe | None) -> nn.Module:
    """Pair the convs with the norms they feed when a recipe asks for it, as ``build_mask_rcnn`` does."""
    for recipe in recipes:
        if recipe is not None:
            recipe.prepare(module)
    return module


def _check_default_resnet(cfg) -> None:
    """Refuse what ``ResNet.make_default_stages`` (the LazyConfig's stage builder) cannot express."""
    res = cfg.MODEL.RESNETS
    expected = {"NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STEM_OUT_CHANNELS": 64, "RES5_DILATION": 1,
                "RES2_OUT_CHANNELS": 256 if res.DEPTH >= 50 else 64}
    wrong = {k: res[k] for k, v in expected.items() if res[k] != v}
    if any(res.DEFORM_ON_PER_STAGE):
        wrong["DEFORM_ON_PER_STAGE"] = res.DEFORM_ON_PER_STAGE
    if wrong:
        raise ValueError(f"build_mabn_resnet_fpn_backbone builds detectron2's default ResNets only: "
                         f"MODEL.RESNETS {wrong} unsupported (expected {expected}, no deformable conv)")


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet-FPN with ``RESNETS.NORM`` and ``FPN.NORM`` resolved to the project's layers.

    Convs feeding MABN are centered and batch-dependent norms of frozen stages (``BACKBONE.FREEZE_AT``)
    become FrozenBatchNorm2d at build time, as detectron2 turns BN into FrozenBN before weights load.
    """
    _check_default_resnet(cfg)
    res = cfg.MODEL.RESNETS
    norm, recipe = resolve_norm(res.NORM, cfg)
    stage_args = {"stride_in_1x1": res.STRIDE_IN_1X1} if res.DEPTH >= 50 else {}  # BasicBlock has no 1x1
    bottom_up = ResNet(NormActStem(input_shape.channels, res.STEM_OUT_CHANNELS, norm=norm),
                       ResNet.make_default_stages(res.DEPTH, block_class(res.DEPTH), norm=norm, **stage_args),
                       out_features=res.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    # center before freezing, as build_mask_rcnn does: frozen stages keep the centered convs (and so the keys)
    # of an ImageNet MABN backbone
    _center(bottom_up, recipe)
    freeze_frozen_blocks(bottom_up)
    fpn_norm, fpn_recipe = resolve_norm(cfg.MODEL.FPN.NORM, cfg)
    fpn = FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
              out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=without_activation(fpn_norm),
              top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
    return _center(fpn, fpn_recipe)


@ROI_BOX_HEAD_REGISTRY.register()
def build_mabn_box_head(cfg, input_shape: ShapeSpec) -> NormActConvFCHead:
    """detectron2's conv-fc box head with ``ROI_BOX_HEAD.NORM`` resolved to the project's layer."""
    args = NormActConvFCHead.from_config(cfg, input_shape)
    args["conv_norm"], recipe = resolve_norm(args["conv_norm"], cfg)
    return _center(NormActConvFCHead(**args), recipe)


@ROI_MASK_HEAD_REGISTRY.register()
def build_mabn_mask_head(cfg, input_shape: ShapeSpec) -> NormActMaskHead:
    """detectron2's conv-upsample mask head with ``ROI_MASK_HEAD.NORM`` resolved to the project's layer."""
    args = NormActMaskHead.from_config(cfg, input_shape)
    args["conv_norm"], recipe = resolve_norm(args["conv_norm"], cfg)
    return _center(NormActMaskHead(**args), recipe)
