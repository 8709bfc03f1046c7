"""The detectron2 plugin: norms by name and by callable, Mask R-CNN per norm, frozen stages, ImageNet weights."""

import pytest
import torch

d2 = pytest.importorskip("detectron2", reason="detectron2 not installed (MABN_D2_SOURCE=skip?)")

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d as D2FrozenBN  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import mabn.d2  # noqa: E402  (registers the project's norms)
from mabn.d2 import data as d2data  # noqa: E402
from mabn.d2 import engine  # noqa: E402
from mabn.d2.checkpoint import d2_to_torchvision, torchvision_to_d2  # noqa: E402
from mabn.d2.model import build_mask_rcnn  # noqa: E402
from mabn.data.detection import ShapesSpec, make_shapes  # noqa: E402
from mabn.dist import cleanup  # noqa: E402
from mabn.models import build_model as build_classifier  # noqa: E402
from mabn.norms import (  # noqa: E402
    BatchRenorm2d,
    FrozenBatchNorm2d,
    MABN2d,
    NormContext,
    batch_dependent_types,
    build_norm,
    norm_types,
    registered_norms,
)
from mabn.norms.centering import is_centered  # noqa: E402
from mabn.optim import param_groups  # noqa: E402

from .tinydata import AnnotationsAsPredictions  # noqa: E402

pytestmark = pytest.mark.detectron2

SMALL = {"rois_per_image": 16, "proposals_per_image": (50, 20), "anchor_sizes": [8, 16, 32, 64, 128]}
TINY_SHAPES = ShapesSpec(num_train=6, num_val=4, image_size=64, min_extent=10, max_extent=28)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    splits = make_shapes(root, TINY_SHAPES)
    return (d2data.register_coco(f"test_shapes_train_{id(root)}", *splits["train"]),
            d2data.register_coco(f"test_shapes_val_{id(root)}", *splits["val"]))


def _norm_sites(model):
    """(site, norm module) for every place the paper puts a norm, found by walking the built model."""
    bottom_up = model.backbone.bottom_up
    sites = [("stem", bottom_up.stem.conv1.norm)]
    for stage_name in ("res2", "res3", "res4", "res5"):
        for block in getattr(bottom_up, stage_name):
            sites += [(stage_name, conv.norm) for conv in (block.conv1, block.conv2, block.conv3)]
            if block.shortcut is not None:
                sites.append((stage_name, block.shortcut.norm))
    fpn = model.backbone
    sites += [("fpn", m.norm) for name, m in fpn.named_children() if name.startswith(("fpn_lateral", "fpn_output"))]
    sites += [("box_head", m.norm) for m in model.roi_heads.box_head.conv_norm_relus]
    sites += [("mask_head", m.norm) for m in model.roi_heads.mask_head.conv_norm_relus]
    return sites


@pytest.mark.parametrize("name", registered_norms())
def test_lazy_config_puts_the_norm_where_the_paper_does(name):
    ctx = NormContext(norm_batch=2, device_batch=2)
    recipe = build_norm(name, ctx)
    model = build_mask_rcnn(recipe, num_classes=4, **SMALL)
    sites = _norm_sites(model)
    assert len([s for s, _ in sites if s == "box_head"]) == 4 and len(model.roi_heads.box_head.fcs) == 1
    assert len([s for s, _ in sites if s == "mask_head"]) == 4
    expected = type(recipe.ctor(8))
    for site, norm in sites:
        if name == "frozenbn" and site in ("fpn", "box_head", "mask_head"):
            assert norm is None, f"{site}: frozen statistics in a randomly initialised layer"
        else:
            assert type(norm) is expected, f"{site} has {type(norm).__name__}"
    assert not [m for m in model.proposal_generator.modules() if isinstance(m, norm_types())]  # RPN head
    centered = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and is_centered(m)]
    mabn_count = sum(isinstance(n, MABN2d) for _, n in sites)
    assert len(centered) == (mabn_count if name == "mabn" else 0)


def _yacs_cfg(norm, *, freeze_at=0, images=2, n=2):
    """A Mask R-CNN R50-FPN yacs config on the project's registered builders, with ``norm`` at every site, at
    ``images`` per device and normalization batch ``n`` (MODEL.MABN keys)."""
    cfg = get_cfg()
    mabn.d2.add_mabn_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.MABN.NORM_BATCH = images, n
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_mabn_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "build_mabn_box_head"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 4, 1
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7  # Base-RCNN-FPN.yaml's, as in the LazyConfig
    cfg.MODEL.ROI_MASK_HEAD.NAME = "build_mabn_mask_head"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    return cfg


def test_yacs_config_by_name():
    cfg = _yacs_cfg("MABN", images=4, n=4)
    cfg.MODEL.ROI_BOX_HEAD.NORM = "brn"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"  # detectron2's own names keep their meaning
    cfg.MODEL.MABN.PARAMS.mabn = CfgNode({"r_max": 3.0})
    model = build_model(cfg)
    by_site = {}
    for site, norm in _norm_sites(model):
        by_site.setdefault(site, set()).add(type(norm))
    assert by_site["stem"] == by_site["res5"] == by_site["fpn"] == {MABN2d}
    assert by_site["box_head"] == {BatchRenorm2d}
    assert by_site["mask_head"] == {torch.nn.GroupNorm}
    stem = model.backbone.bottom_up.stem.conv1.norm
    assert stem.window == 8 and stem.r_max == 3.0  # window = 32 / n, hyper-parameter from the context
    centered = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and is_centered(m)]
    assert len(centered) == sum(isinstance(n, MABN2d) for _, n in _norm_sites(model))  # weight centering too
    ctor, recipe = mabn.d2.resolve_norm("MABN")  # outside a context: the registry defaults (window 16)
    assert ctor(16).window == 16 and recipe.name == "mabn"
    assert mabn.d2.resolve_norm("BN") == ("BN", None)  # detectron2's own name: not the project's
    assert mabn.d2.resolve_norm("") == ("", None)


def test_yacs_keys_carry_the_runtime_facts_and_a_helper_names_every_site(tmp_path):
    """add_mabn_config: MODEL.MABN.* from a YAML file (what tools/train_net.py's --config-file merges); without the
    keys the facts follow SOLVER (n = images per device); set_norm names the norm and the three builders; a name
    neither detectron2 nor the registry knows is refused naming both lists. No module global is involved."""
    cfg = get_cfg()
    mabn.d2.add_mabn_config(cfg)
    (tmp_path / "mabn.yaml").write_text("SOLVER:\n  IMS_PER_BATCH: 8\n  MAX_ITER: 90\nMODEL:\n  MABN:\n"
                                       "    NORM_BATCH: 2\n    PARAMS:\n      mabn:\n        r_max: 3.0\n")
    cfg.merge_from_file(str(tmp_path / "mabn.yaml"))
    mabn.d2.set_norm(cfg, "MABN")
    assert [cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_MASK_HEAD.NAME] == \
        ["build_mabn_resnet_fpn_backbone", "build_mabn_box_head", "build_mabn_mask_head"]
    assert {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM} \
        == {"MABN"}
    ctor, recipe = mabn.d2.resolve_norm("MABN", cfg)
    layer = ctor(16)
    assert (layer.group_size, layer.window, layer.r_max) == (2, 16, 3.0) and recipe.name == "mabn"
    assert layer.renorm_iters == recipe.params["renorm_iters"] * 4  # counted in normalization batches: 4 a step
    plain = get_cfg()  # no MODEL.MABN: the images per device are the normalization batch
    plain.SOLVER.IMS_PER_BATCH = 4
    assert mabn.d2.resolve_norm("brn", plain)[0](8).group_size is None
    with pytest.raises(ValueError, match=r"unknown norm 'MBN': detectron2's names are BN, SyncBN, .*; the "
                                         r"project's \(any case\) are bn, .*mabn"):
        mabn.d2.resolve_norm("MBN", cfg)


@pytest.mark.parametrize("name", ["mabn", "brn", "gn", "frn"])
def test_yacs_builders_build_the_lazy_config_model(name):
    """The registered yacs builders and build_mask_rcnn give the same network, norms at the same sites."""
    ctx = NormContext(norm_batch=2, device_batch=2)
    model = build_model(_yacs_cfg(name))
    lazy = build_mask_rcnn(build_norm(name, ctx), num_classes=4, **SMALL)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (model, lazy)]
    assert shapes[0] == shapes[1]
    assert [(s, type(n)) for s, n in _norm_sites(model)] == [(s, type(n)) for s, n in _norm_sites(lazy)]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    box = model.roi_heads.box_head(torch.zeros(0, 256, 7, 7, requires_grad=True))
    mask = model.roi_heads.mask_head.layers(torch.zeros(0, 256, 14, 14, requires_grad=True))
    assert box.shape == (0, 1024) and mask.shape == (0, 4, 28, 28)  # heads accept zero RoIs
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_yacs_frozen_stages_hold_no_live_batch_statistics():
    model = build_model(_yacs_cfg("MABN", freeze_at=2))
    bottom_up = model.backbone.bottom_up
    for frozen in (bottom_up.stem, bottom_up.res2):
        norms = [m for m in frozen.modules() if isinstance(m, (*norm_types(), D2FrozenBN))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert is_centered(bottom_up.stem.conv1)  # centered before freezing, as build_mask_rcnn does
    assert isinstance(bottom_up.res3[0].conv1.norm, MABN2d) and bottom_up.res3[0].conv1.weight.requires_grad


def test_yacs_builders_refuse_what_they_cannot_build():
    cfg = _yacs_cfg("MABN")
    cfg.MODEL.RESNETS.NUM_GROUPS = 32
    with pytest.raises(ValueError, match="NUM_GROUPS"):
        build_model(cfg)


_IMPORT_SIDE_EFFECTS = """
import json, sys
import detectron2.config, detectron2.engine, detectron2.layers, detectron2.modeling
from detectron2.layers import batch_norm
from detectron2.modeling import BACKBONE_REGISTRY

original = batch_norm.get_norm
def globals_of_detectron2():
    return {n: dict(vars(m)) for n, m in list(sys.modules.items()) if n.startswith("detectron2") and m}
before = globals_of_detectron2()
import mabn.d2, mabn.d2.checkpoint, mabn.d2.data, mabn.d2.engine, mabn.d2.model
after = globals_of_detectron2()
try:
    original("MABN", 8)
    unknown = False
except KeyError:
    unknown = True
print(json.dumps({
    "changed": sorted(f"{n}.{k}" for n, g in before.items() for k, v in g.items()
                      if after[n].get(k) is not v),
    "holders": sorted(n for n, g in after.items() if "get_norm" in g),
    "replaced": sorted(n for n, g in after.items() if g.get("get_norm", original) is not original),
    "mabn_unknown_to_detectron2": unknown,
    "registered": "build_mabn_resnet_fpn_backbone" in BACKBONE_REGISTRY,
}))
"""


def test_importing_the_plugin_leaves_detectron2_untouched():
    """Importing mabn.d2 after detectron2 replaces no global of any detectron2 module (get_norm included)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_SIDE_EFFECTS], capture_output=True, text=True,
                         env=env, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "detectron2.modeling.backbone.resnet" in result["holders"] and len(result["holders"]) > 5
    assert result["replaced"] == [] and result["changed"] == []
    assert result["mabn_unknown_to_detectron2"] and result["registered"]


def _step(model, loader, optimizer, iterations=2):
    trainer = engine.make_trainer(model, loader, optimizer, amp_dtype=None)
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(iterations):
            trainer.iter = it
            trainer.run_step()
        return storage.latest()["total_loss"][0]


@pytest.mark.parametrize("name", registered_norms())
def test_two_training_iterations_per_norm(name, shapes):
    recipe = build_norm(name, NormContext(norm_batch=2, device_batch=2, total_iters=10))
    model = build_mask_rcnn(recipe, num_classes=4, **SMALL)
    mapper = d2data.mapper(is_train=True, min_size=64, max_size=64, image_format="RGB", mask_format="bitmask")
    loader = d2data.train_loader(shapes[0], mapper, images_per_device=2, world_size=1, seed=0, start_iter=0,
                                 workers=0)
    optimizer = torch.optim.SGD(param_groups(model, 1e-4, 1e-4), lr=0.01, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _step(model, loader, optimizer)
    assert torch.isfinite(torch.tensor(loss))
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("backbone.bottom_up.res5" in k for k in changed) and any("mask_head" in k for k in changed)
    if name == "mabn":  # two normalization batches (one per step) in the backbone and in the heads
        assert int(model.backbone.bottom_up.stem.conv1.norm.num_batches_tracked) == 2
        assert int(model.roi_heads.box_head.conv1.norm.num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "gn"])
def test_heads_accept_zero_rois(name):
    model = build_mask_rcnn(build_norm(name, NormContext(norm_batch=2, device_batch=2)), num_classes=4, **SMALL)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    box = model.roi_heads.box_head(torch.zeros(0, 256, 7, 7, requires_grad=True))
    mask_in = torch.zeros(0, 256, 14, 14, requires_grad=True)
    mask = model.roi_heads.mask_head.layers(mask_in)
    assert box.shape == (0, 1024) and mask.shape == (0, 4, 28, 28)
    (box.sum() + mask.sum()).backward()
    assert mask_in.grad.shape == mask_in.shape
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # no state touched


@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "syncbn"])
def test_frozen_stages_hold_no_live_batch_statistics(name):
    model = build_mask_rcnn(build_norm(name, NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                            freeze_at=2, **SMALL)
    bottom_up = model.backbone.bottom_up
    for frozen in (bottom_up.stem, bottom_up.res2):
        assert not any(p.requires_grad for p in frozen.parameters())
        norms = [m for m in frozen.modules() if isinstance(m, (*norm_types(), D2FrozenBN))]
        assert norms and not [m for m in norms if isinstance(m, batch_dependent_types())]
    live = [m for m in bottom_up.res3.modules() if isinstance(m, batch_dependent_types())]
    assert live and all(p.requires_grad for m in live for p in m.parameters())


def test_frozen_copy_of_mabn_keeps_its_eval_map():
    mabn_layer = MABN2d(8)
    with torch.no_grad():
        mabn_layer.running_var.uniform_(0.5, 2.0)
        mabn_layer.weight.normal_()
        mabn_layer.bias.normal_()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    mabn_layer.double().eval()
    torch.testing.assert_close(FrozenBatchNorm2d.from_batchnorm(mabn_layer)(x), mabn_layer(x))


def _imagenet_resnet50(name, tmp_path):
    """A train_imagenet.py-style ResNet-50 with non-trivial norm state, saved as its checkpoint format."""
    recipe = build_norm(name, NormContext(norm_batch=2, device_batch=4))
    net = build_classifier("resnet50", recipe, num_classes=10)  # centers the convs feeding MABN
    net.train()
    for _ in range(3):
        net(torch.randn(4, 3, 64, 64)).sum().backward()
    path = tmp_path / f"{name}.pt"
    torch.save({"model": net.state_dict(), "config": {"norm": {"name": name}}}, path)
    return net, recipe, path


def test_imagenet_checkpoint_maps_into_the_detectron2_backbone(tmp_path):
    net, _, path = _imagenet_resnet50("mabn", tmp_path)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    mapped = torchvision_to_d2(net.state_dict())
    assert d2_to_torchvision(mapped).keys() == state.keys()  # round trip, MABN rings and counters included
    assert any(k.endswith("stem.conv1.parametrizations.weight.original") for k in mapped)

    det = build_mask_rcnn(build_norm("mabn", NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                          weights=str(path), **SMALL)
    det_state = det.state_dict()
    for key, value in mapped.items():
        if key.endswith(("ring_x2", "ring_gz", "num_batches_tracked")):
            assert not det_state[key].any(), f"{key}: warm-up restarts on purpose"
        else:
            torch.testing.assert_close(det_state[key], value, rtol=0, atol=0, msg=key)
    # the same function: eval-mode res5 features equal torchvision's layer4 output
    net.eval()
    det.eval()
    _assert_same_res5(net, det)


@pytest.mark.parametrize("name", ["cbn", "brn"])
def test_fine_tuning_restarts_every_batch_dependent_norm(name, tmp_path):
    """cbn (rings, window, burn-in counter) and brn (schedule counter) from an ImageNet checkpoint: their history
    restarts in the detectron2 backbone as mabn's does, their population statistics and affine are loaded."""
    from mabn.d2.checkpoint import restartable_keys

    net, _, path = _imagenet_resnet50(name, tmp_path)
    mapped = torchvision_to_d2(net.state_dict())
    det = build_mask_rcnn(build_norm(name, NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                          weights=str(path), **SMALL)
    history = restartable_keys(det)
    assert history and all(k.endswith("num_batches_tracked") or name == "cbn" for k in history)
    if name == "cbn":
        assert any("ring" in k or "window" in k for k in history), sorted(history)[:5]
    det_state = det.state_dict()
    fresh = build_mask_rcnn(build_norm(name, NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                            **SMALL).state_dict()
    assert any(mapped[k].any() for k in history if k in mapped)  # there was history to restart
    for key, value in mapped.items():
        if key in history:
            torch.testing.assert_close(det_state[key], fresh[key], rtol=0, atol=0, msg=f"{key}: restarted")
        else:
            torch.testing.assert_close(det_state[key], value, rtol=0, atol=0, msg=key)


def test_checkpoint_of_another_norm_is_refused(tmp_path):
    _, _, path = _imagenet_resnet50("bn", tmp_path)
    with pytest.raises(ValueError, match="does not fit this backbone.*missing"):
        build_mask_rcnn(build_norm("mabn", NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                        weights=str(path), **SMALL)
    model = build_mask_rcnn(build_norm("frozenbn"), num_classes=4, weights=str(path), freeze_at=2, **SMALL)
    assert isinstance(model.backbone.bottom_up.res4[0].conv1.norm, FrozenBatchNorm2d)


def test_coco_evaluation_with_pycocotools(shapes, tmp_path):
    """Predicting the annotations gives AP 100 (box and mask); predicting half of them gives less."""
    mapper = d2data.mapper(is_train=False, min_size=64, max_size=64, image_format="RGB", mask_format="bitmask")
    perfect = d2data.evaluate_coco(AnnotationsAsPredictions(shapes[1]), shapes[1], mapper,
                                   str(tmp_path / "a"))
    assert perfect["bbox"]["AP"] == pytest.approx(100.0) and perfect["segm"]["AP"] == pytest.approx(100.0)
    half = d2data.evaluate_coco(AnnotationsAsPredictions(shapes[1], keep_every=2), shapes[1], mapper,
                                str(tmp_path / "b"))
    assert 0 < half["bbox"]["AP"] < 90 and 0 < half["segm"]["AP"] < 90
    assert (tmp_path / "a" / "coco_instances_results.json").exists()


def test_shapes_set_written_by_concurrent_jobs_and_replaced_on_a_new_spec(tmp_path):
    import dataclasses
    import json
    import multiprocessing

    root = tmp_path / "shapes"
    with multiprocessing.get_context("spawn").Pool(3) as pool:  # three jobs of a sweep starting together
        results = pool.starmap(make_shapes, [(root, TINY_SHAPES)] * 3)
    assert all(r == results[0] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no staging copies left behind
    train = json.loads(results[0]["train"][0].read_text())
    assert len(train["images"]) == TINY_SHAPES.num_train
    assert sorted(p.name for p in results[0]["train"][1].iterdir()) == sorted(x["file_name"] for x in train["images"])

    (root / "train" / "000001.png").unlink()  # a set of another spec is replaced as a whole
    bigger = dataclasses.replace(TINY_SHAPES, num_train=TINY_SHAPES.num_train + 1)
    splits = make_shapes(root, bigger)
    assert len(json.loads(splits["train"][0].read_text())["images"]) == bigger.num_train
    assert (root / "train" / "000001.png").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_shapes_set_is_deterministic_with_exact_disjoint_masks(tmp_path):
    import json

    import numpy as np
    from pycocotools import mask as mask_util

    a = make_shapes(tmp_path / "a", TINY_SHAPES)
    b = make_shapes(tmp_path / "b", TINY_SHAPES)
    ja, jb = (json.loads(s["train"][0].read_text()) for s in (a, b))
    assert ja["annotations"] == jb["annotations"] and len(ja["categories"]) == 4
    assert (a["train"][1] / "000001.png").read_bytes() == (b["train"][1] / "000001.png").read_bytes()
    for image in ja["images"]:
        masks = [mask_util.decode(x["segmentation"]) for x in ja["annotations"] if x["image_id"] == image["id"]]
        assert masks and np.stack(masks).sum(0).max() == 1  # occlusion: visible parts never overlap
    for x in ja["annotations"]:
        m = mask_util.decode(x["segmentation"])
        ys, xs = np.nonzero(m)
        assert x["area"] == m.sum() and x["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                      ys.max() - ys.min() + 1]


_RELUS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluAfterNorm(torch.overrides.TorchFunctionMode):
    """For each norm call, whether the first op its output goes into is a ReLU (a ReLU after the norm)."""

    def __init__(self, model):
        super().__init__()
        self.pending, self.relu_after = {}, {}
        norms = [(n, m) for n, m in model.named_modules() if n.endswith(".norm") and m is not None]
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in norms]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.pending[id(output)] = (name, output)  # the tensor kept alive: its id stays its own
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(arg, torch.Tensor) and id(arg) in self.pending:
                name, _ = self.pending.pop(id(arg))
                self.relu_after.setdefault(name, set()).add(func in _RELUS)
        return func(*args, **kwargs)


def _relu_after_each_norm(model, batch):
    """{norm module name: whether a ReLU follows it} over one training forward of Mask R-CNN."""
    model.train()
    with EventStorage(0), _ReluAfterNorm(model) as trace:
        model(batch)
    for handle in trace.handles:
        handle.remove()
    assert all(len(v) == 1 for v in trace.relu_after.values())  # every call of a norm alike
    return {name: seen.pop() for name, seen in trace.relu_after.items()}


@pytest.mark.parametrize("name", ["evonorm_s0", "frn"])
def test_norms_that_carry_their_activation_get_no_second_relu(name, shapes):
    """One activation per position, where detectron2 puts one with BN: the norm's own (no ReLU after it);
    where detectron2 puts none (bottleneck conv3, shortcut, FPN), the norm without its activation."""
    from mabn.models import carries_activation

    ctx = NormContext(norm_batch=2, device_batch=2)
    mapper = d2data.mapper(is_train=True, min_size=64, max_size=64, image_format="RGB", mask_format="bitmask")
    batch = next(iter(d2data.train_loader(shapes[0], mapper, images_per_device=2, world_size=1, seed=0,
                                          start_iter=0, workers=0)))
    reference = _relu_after_each_norm(build_mask_rcnn(build_norm("bn", ctx), num_classes=4, **SMALL), batch)
    model = build_mask_rcnn(build_norm(name, ctx), num_classes=4, **SMALL)
    traced = _relu_after_each_norm(model, batch)
    assert traced.keys() == reference.keys() == {f"{n}.norm" for n, m in model.named_modules()
                                                 if getattr(m, "norm", None) is not None}
    for site, relu in reference.items():
        norm = model.get_submodule(site)
        assert (carries_activation(norm), traced[site]) == (relu, False), site
    acts = {s.split(".")[1] for s, relu in reference.items() if relu}
    plain = {s.split(".")[1] for s, relu in reference.items() if not relu}
    assert acts == {"bottom_up", "box_head", "mask_head"} and plain == {"bottom_up", "fpn_lateral2",
                                                                        "fpn_lateral3", "fpn_lateral4",
                                                                        "fpn_lateral5", "fpn_output2",
                                                                        "fpn_output3", "fpn_output4",
                                                                        "fpn_output5"}


@pytest.mark.parametrize("name", ["evonorm_s0", "frn"])
def test_imagenet_backbone_of_such_a_norm_keeps_its_function(name, tmp_path):
    """train_imagenet.py's ResNet-50 (one activation per position, mabn.models.activations) loads into the
    detectron2 backbone key for key and computes the same res5 features."""
    net, _, path = _imagenet_resnet50(name, tmp_path)
    det = build_mask_rcnn(build_norm(name, NormContext(norm_batch=2, device_batch=2)), num_classes=4,
                          weights=str(path), **SMALL)
    net.eval()
    det.eval()
    _assert_same_res5(net, det)


def _assert_same_res5(net, det) -> None:
    """Eval-mode res5 features of the detectron2 backbone equal torchvision's layer4 output."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tv = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        torch.testing.assert_close(det.backbone.bottom_up(x)["res5"], tv, rtol=1e-4, atol=1e-5)


class _LossNaNOnRank1(torch.nn.Module):
    """A detector stand-in: a loss dict whose loss is NaN on rank 1 from the second iteration on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        bad = torch.distributed.get_rank() == 1 and self.calls >= 2
        return {"loss": self.w.sum() * (float("nan") if bad else 1.0)}


def _nan_on_one_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _LossNaNOnRank1()
    trainer = engine.make_trainer(model, iter(lambda: [{}], None), torch.optim.SGD(model.parameters(), lr=0.1),
                                  amp_dtype=None)
    try:
        trainer.train(0, 5)
        result = "finished"
    except FloatingPointError as err:
        result = f"FloatingPointError at {trainer.iter}: {err}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)
    torch.distributed.barrier()  # as mabn.entry.run_job: no rank tears the group down while another uses it
    cleanup()  # mabn.dist's: detectron2's cached handle of the group goes with it


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """detectron2 checks the loss on the main process only (the other ranks would wait in the next
    collective); the project's trainer checks it on every rank: both stop at the same iteration."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_nan_on_one_rank, args=(port, str(tmp_path / "r")), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        assert time.time() < deadline, "a rank is still waiting: the NaN stopped only one of them"
    results = [(tmp_path / f"r.{rank}").read_text() for rank in (0, 1)]
    expected = "FloatingPointError at 1: Loss became infinite or NaN at iteration=1"
    assert all(r.startswith(expected) for r in results), results
