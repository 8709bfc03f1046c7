"""convert_norms / revert_norms on torchvision, timm and detectron2 models; model=timm in training."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from mabn.fold import fold_norms
from mabn.norms import (
    BatchNorm2d,
    EvoNormS0,
    GroupNorm,
    MABN2d,
    NormAct2d,
    NormContext,
    convert_norms,
    is_paired,
    revert_norms,
)

from .test_train import ROOT, TINY, run_dir, train
from .tinydata import make_fmnist_like

CTX = NormContext(norm_batch=2, device_batch=4)


def _resnet50():
    return torchvision.models.resnet50(weights=None)


def _timm_regnet():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = timm.create_model("regnetx_002", pretrained=False)
    assert all(isinstance(m, BatchNormAct2d) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return model


def _d2_r50_fpn():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    cfg = get_cfg()  # RESNETS.NORM: FrozenBN, detectron2's default
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))


# builder, BN-family layers it holds, their class name
MODELS = {"tv_resnet50": (_resnet50, 53, "BatchNorm2d"),
          "timm_regnetx_002": (_timm_regnet, 44, "BatchNormAct2d"),
          "d2_r50_fpn": (_d2_r50_fpn, 53, "FrozenBatchNorm2d")}


def _family(model, cls_name):
    return [m for m in model.modules() if type(m).__name__ == cls_name and type(m).__module__.split(".")[0]
            in ("torch", "timm", "detectron2")]


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    """(name, float64 eval-mode model with random BN statistics and affine, BN-family count, class name)."""
    builder, count, cls_name = MODELS[request.param]
    torch.manual_seed(0)
    model = builder().double().eval()
    layers = _family(model, cls_name)
    assert len(layers) == count
    with torch.no_grad():
        for m in layers:
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return request.param, model, count, cls_name


def _outputs(model, x):
    out = model(x)
    return list(out.values()) if isinstance(out, dict) else [out]


def _close(a, b, tol=1e-10):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


X = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target, new_type", [("bn", BatchNorm2d), ("frozenbn", None), ("cbn", None)])
def test_every_bn_layer_replaced_with_equal_eval_outputs(built, target, new_type):
    name, original, count, cls_name = built
    model = copy.deepcopy(original)
    _, report = convert_norms(model, {"name": target}, CTX, return_report=True)
    assert len(report.converted) == count and not _family(model, cls_name)
    assert all({"running_mean", "running_var", "weight", "bias"} <= set(c.copied) for c in report.converted)
    with torch.no_grad():
        _close(_outputs(model, X), _outputs(original, X))
    if new_type is not None:
        assert sum(isinstance(m, new_type) for m in model.modules()) == count


def test_mabn_trains_one_step_then_reverts_to_plain_batchnorm(built):
    name, original, count, cls_name = built
    model = copy.deepcopy(original)
    _, report = convert_norms(model, {"name": "mabn", "warmup_iters": 0}, CTX, return_report=True)
    assert sum(isinstance(m, MABN2d) for m in model.modules()) == count
    assert len(report.paired) == count and not report.unpaired  # every MABN's feeding conv is centered
    assert report.converted[0].copied == ("weight", "bias", "running_var (+ running_mean²)")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = sum(o.square().mean() for o in _outputs(model, torch.randn(4, 3, 64, 64, dtype=torch.float64)))
    loss.backward()
    optimizer.step()
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert torch.isfinite(loss) and moved
    model.eval()
    with torch.no_grad():
        expected = _outputs(model, X)
    _, reverted = revert_norms(model, return_report=True)
    assert len(reverted.converted) == count and len(reverted.baked) == count and not reverted.left
    assert not any(isinstance(m, MABN2d) for m in model.modules())
    assert len(_family(model, cls_name)) == count  # the original classes again (timm's, detectron2's, torch's)
    assert not any(is_paired(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        _close(_outputs(model, X), expected, tol=1e-12)


def test_timm_batchnormact_keeps_its_activation():
    model = _timm_regnet().eval()
    acts = [type(m.act) for m in model.modules() if hasattr(m, "act") and isinstance(m, nn.BatchNorm2d)]
    with_act = sum(a is not nn.Identity for a in acts)
    assert 0 < with_act < len(acts)  # the residual branch's last norm has none
    bn = copy.deepcopy(model)
    convert_norms(bn, "bn")
    wrapped = [m for m in bn.modules() if isinstance(m, NormAct2d)]
    assert len(wrapped) == with_act and all(isinstance(m.act, nn.ReLU) for m in wrapped)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(bn(x), model(x))
    evo = copy.deepcopy(model)
    _, report = convert_norms(evo, {"name": "evonorm_s0", "num_groups": 8}, return_report=True)
    evonorms = [m for m in evo.modules() if isinstance(m, EvoNormS0)]
    assert not any(isinstance(m, NormAct2d) for m in evo.modules())  # it carries its activation: no ReLU
    assert sum(m.apply_act for m in evonorms) == with_act and len(evonorms) == len(acts)
    assert "replaces the layer's ReLU" in report.converted[0].note


@pytest.mark.parametrize("target", ["mabn", "bn"])
def test_model_equals_convert_norms_and_revert_loads_into_stock_timm_strictly(target):
    """The conventions: ``model = convert_norms(...)`` (the model, as convert_sync_batchnorm), and a reverted
    timm model (BatchNormAct2d layers, some wrapped with their ReLU while converted) has timm's classes and
    keys again: its state dict loads strictly into a stock timm model, with the same eval outputs."""
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = _timm_regnet()
    returned = convert_norms(model, {"name": target}, CTX)
    assert returned is model and any(isinstance(m, NormAct2d) for m in model.modules())
    model.train()
    model(torch.randn(8, 3, 32, 32)).sum().backward()  # statistics and (mabn) centered convs move
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert revert_norms(model) is model
    assert not any(isinstance(m, NormAct2d) for m in model.modules())
    stock = timm.create_model("regnetx_002", pretrained=False).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), stock.modules(), strict=True))
    assert sum(isinstance(m, BatchNormAct2d) for m in stock.modules()) == 44
    with torch.no_grad():
        torch.testing.assert_close(stock(x), expected, rtol=1e-4, atol=1e-5)


def test_fold_norms_refuses_a_model_in_train_mode():
    """Folding bakes the eval-mode map: a model in train mode would silently change what it computes."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match=r"fold_norms: the model is in train mode, .* call model.eval\(\) first"):
        fold_norms(model)
    folded = fold_norms(model.eval())
    assert not folded.training and isinstance(folded[1], nn.Identity)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.ours = MABN2d(8)
        self.bn1d = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y = self.ours(self.gn(self.bn(self.conv(x)))).mean(dim=(2, 3))
        return self.ln(self.bn1d(y))


def test_report_lists_what_it_left_and_why():
    model = _Mixed()
    _, report = convert_norms(model, "gn", return_report=True)
    assert [(c.name, c.old_type, c.new_type, c.copied) for c in report.converted] == \
        [("bn", "BatchNorm2d", "GroupNorm", ("weight", "bias"))]
    assert isinstance(model.bn, GroupNorm)
    reasons = {x.name: x.reason for x in report.left}
    assert reasons == {"gn": "not a BatchNorm-family layer", "ours": "already a registry norm",
                       "bn1d": "not a 2d BatchNorm: the registry's norms normalize (N, C, H, W) inputs",
                       "ln": "not a BatchNorm-family layer"}
    model(torch.randn(2, 3, 8, 8))
    _, reverted = revert_norms(model, return_report=True)
    assert [c.name for c in reverted.converted] == ["ours"] and type(model.ours) is nn.BatchNorm2d
    assert [x.name for x in reverted.left] == ["bn"] and "batch-free" in reverted.left[0].reason
    assert "left bn: GroupNorm: batch-free" in str(reverted)


@pytest.mark.parametrize("cfg, message", [
    ({"name": "mabn", "windw": 4}, r"unknown hyper-parameter\(s\) \['windw'\] for norm 'mabn'"),
    ({"name": "mabn", "eps": -1.0}, "norm.eps must be a positive number"),
    ({"name": "nope"}, "unknown norm 'nope'; registered norms:"),
    ({"name": "gn", "num_groups": 4}, r"conv.1 \(BatchNorm2d, 6 channels\) cannot become gn: .* \(this model's "
     r"norm widths: 6; num_groups that suit every layer: 1, 2, 3, 6\)"),
])
def test_bad_norm_config_raises_naming_it_and_leaves_the_model(cfg, message):
    model = nn.Sequential()
    model.add_module("conv", nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match=message):
        convert_norms(model, cfg, CTX)
    assert type(model.conv[1]) is nn.BatchNorm2d


def test_no_optional_library_is_imported():
    code = ("import sys, torchvision; from mabn.norms import convert_norms; "
            "_, r = convert_norms(torchvision.models.resnet18(), 'mabn', return_report=True); "
            "assert len(r.converted) == 20; "
            "assert not {'detectron2', 'timm'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


# train_imagenet.py with model=timm: TINY without its model keys
TIMM = [a for a in TINY if not a.startswith("model")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fmnist_like(tmp_path_factory.mktemp("fmnist"))


@pytest.mark.parametrize("arch, norm", [("regnetx_002", "mabn"), ("resnet10t", "gn")])
def test_train_imagenet_trains_a_timm_model(arch, norm, tmp_path, data_root):
    pytest.importorskip("timm")
    train(["model=timm", f"model.arch={arch}", f"norm={norm}", "batch=2"], tmp_path, data_root, base=TIMM)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["model"] == "timm" and summary["norm"] == norm
    assert summary["iters"] == 4 and summary["norm_batch"] == 2
    state = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)["model"]
    if norm == "mabn":
        assert any(k.endswith("ring_x2") for k in state)  # MABN layers trained
        assert not any(k.endswith("running_mean") for k in state)  # no BatchNorm left


@pytest.mark.parametrize("args, message", [
    (["model.arch=resnet_nope"], "unknown timm model model.arch='resnet_nope'"),
    ([], "model=timm needs model.arch=<a timm model name>"),
])
def test_bad_timm_arch_exits_2_naming_it(args, message, tmp_path, data_root):
    pytest.importorskip("timm")
    out = train(["model=timm", "norm=mabn", "batch=2", *args], tmp_path, data_root, base=TIMM, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_groups_that_do_not_suit_a_timm_model_exit_2_and_the_corrected_command_runs(tmp_path, data_root):
    """regnetx_002 has 56-channel layers: gn's 32 groups do not divide them. The error names the keys and
    the group counts that suit every layer, leaves no claim behind, and the corrected command trains."""
    pytest.importorskip("timm")
    args = ["model=timm", "model.arch=regnetx_002", "norm=gn", "batch=2"]
    out = train(args, tmp_path, data_root, base=TIMM, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert ("config error: model=timm (model.arch=regnetx_002) with norm=gn: convert_norms: s2.b1.conv1.bn "
            "(BatchNormAct2d, 56 channels) cannot become gn") in out.stderr
    assert "num_groups that suit every layer: 1, 2, 4, 8, 184, 368)" in out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())
    train([*args, "norm.num_groups=8"], tmp_path, data_root, base=TIMM)
    assert json.loads((run_dir(tmp_path) / "summary.json").read_text())["norm_params"]["num_groups"] == 8


def test_the_norm_library_imports_no_compiler_until_it_is_used():
    """``import mabn.norms`` and the eager layers load neither dynamo, inductor, triton nor sympy (over a second
    of import time before: cbn's compile guard imported dynamo); cbn's first layer does (its guard), and a
    compiled layer still compiles."""
    code = """
import sys, time, torch
t = time.perf_counter()
import mabn.norms
from mabn.norms import build_norm
took = time.perf_counter() - t
heavy = {'torch._dynamo', 'torch._inductor', 'triton', 'sympy'}
x = torch.randn(4, 8, 3, 3)
for name in ('bn', 'brn', 'mabn', 'gn', 'frn', 'evonorm_s0', 'gnws', 'ln', 'in', 'frozenbn'):
    build_norm(name).ctor(8)(x)
assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))
build_norm('cbn').ctor(8)
assert 'torch._dynamo' in sys.modules
print(f'import mabn.norms: {took:.3f} s')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "import mabn.norms:" in out.stdout


@pytest.mark.parametrize("name", ["mabn", "bn", "frn"])
def test_registry_norms_as_timm_and_torchvision_norm_layers(name):
    """``recipe.ctor`` is a norm_layer for timm's ResNet and torchvision's (they pass device/dtype);
    ``timm_norm_layer(recipe)`` for timm's norm + activation models (RegNet's ConvNormAct): the recipe's norm,
    then timm's activation where the stock model has one (a norm that carries its own activation replaces it)."""
    timm = pytest.importorskip("timm")
    import torchvision

    from mabn.norms import build_norm, protocol, timm_norm_layer

    recipe = build_norm(name, CTX)
    x = torch.randn(8, 3, 64, 64)
    mine = type(recipe.ctor(8))
    for model in (timm.create_model("resnet18", pretrained=False, norm_layer=recipe.ctor),
                  torchvision.models.resnet18(norm_layer=recipe.ctor)):
        recipe.prepare(model)
        model(x).sum().backward()
        assert sum(isinstance(m, mine) for m in model.modules()) == 20
    stock = timm.create_model("regnetx_002", pretrained=False)
    model = timm.create_model("regnetx_002", pretrained=False, norm_layer=timm_norm_layer(recipe))
    recipe.prepare(model)
    model(x).sum().backward()
    norms = [m for m in model.modules() if isinstance(m, mine)]
    assert len(norms) == 44 and all(getattr(m, "group_size", 2) == 2 for m in norms)
    stock_acts = sum(isinstance(m.act, nn.ReLU) for m in stock.modules() if hasattr(m, "act") and
                     isinstance(m, nn.BatchNorm2d))
    if protocol.carries_activation(norms[0]) or any(protocol.carries_activation(m) for m in norms):
        assert sum(protocol.carries_activation(m) for m in norms) == stock_acts  # its own, where timm had one
    else:
        wrapped = [m for m in model.modules() if isinstance(m, NormAct2d)]
        assert sum(isinstance(m.act, nn.ReLU) for m in wrapped) == stock_acts
