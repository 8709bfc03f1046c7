"""train.cuda_graphs: refused where it cannot run (CPU, fp16, compile, ...); on CUDA a graphed run equals
eager (losses, weights, norm state, momentum), step by step and through the entry script; compiled == eager
on CUDA; one NCCL process under torchrun."""

import copy
import json
import sys

import pytest
import torch
from torch import nn

from mabn.config import ConfigError, validate
from mabn.engine import StepContext, eager_step, read_probe
from mabn.graphs import GraphedStep, check_capturable, place_lrs
from mabn.models import build_model
from mabn.norms import NormContext, build_norm
from mabn.optim import build_optimizer

from .test_compile import GROUPED
from .test_compile import _model as compile_model
from .test_configs import compose_cfg
from .test_train import run_dir, train
from .tinydata import make_fmnist_like

OPTIM = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "norm_weight_decay": 0.0, "nesterov": False}
# every phase within STEPS steps of 4 normalization batches: warm-up, moving averages, renormalization
NORM_PARAMS = {"mabn": {"window": 4, "warmup_iters": 2, "renorm_iters": 3, "r_max": 1.5},
               "brn": {"warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 4}, "bn": {}}
STEPS = 9  # 3 eager warm-up steps, the captured step, 5 more replays


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fmnist_like(tmp_path_factory.mktemp("fmnist"))


def test_cuda_graphs_refused_on_cpu(tmp_path, data_root):
    """On a CPU the entry script exits 2 naming the key, before any data, model or run directory."""
    out = train(["norm=mabn", "batch=2", "train.device=cpu", "train.cuda_graphs=true"], tmp_path, data_root,
                check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error: train.cuda_graphs=true needs a CUDA device, but this process runs on cpu" \
        in out.stderr
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "an invalid config must leave no run directory"


@pytest.mark.parametrize("override, message", [
    ("train.amp=fp16", "train.cuda_graphs=true with train.amp=fp16"),
    ("train.compile=true", "train.cuda_graphs=true with train.compile=true"),
    ("diag.batch_stats=true", "train.cuda_graphs=true with diag.batch_stats=true"),
])
def test_cuda_graphs_refusals_on_cuda(override, message, data_root):
    cfg = compose_cfg("data=fmnist", f"data.root={data_root}", "norm=mabn", "batch=2",
                      "train.cuda_graphs=true", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1, "cuda")
    validate(compose_cfg("data=fmnist", f"data.root={data_root}", "train.cuda_graphs=true"), 1, "cuda")
    with pytest.raises(ConfigError, match="runs one process"):
        validate(compose_cfg("data=fmnist", f"data.root={data_root}", "train.cuda_graphs=true"), 2, "cuda")


def test_capturable_optimizer_is_plain_sgd():
    """Fused SGD with a tensor lr under the step's LambdaLR == the plain SGD (CPU, float rounding apart)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, OPTIM, 0.1, capturable=c) for m, c in zip(models, (False, True), strict=True)]
    check_capturable(opts[1])
    with pytest.raises(ValueError, match="capturable=True"):
        check_capturable(opts[0])
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 / (1 + i)) for o in opts]
    for _ in range(4):
        x = torch.randn(6, 4)
        lrs = []
        for m, o, s in zip(models, opts, scheds, strict=True):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            s.step()
            lrs.append(read_probe(torch.zeros(2, dtype=torch.float64), o.param_groups[0]["lr"], 1)[1])
        assert lrs[0] == pytest.approx(lrs[1], rel=1e-6)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opts[1].param_groups[0]["lr"] = 0.5  # e.g. a resumed optimizer state: back to a float32 tensor
    place_lrs(opts[1], torch.device("cpu"))
    lr = opts[1].param_groups[0]["lr"]
    assert lr.dtype == torch.float32 and float(lr) == 0.5


def test_graphed_step_refuses_a_cpu_context():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedStep(model, build_optimizer(model, OPTIM, 0.1, capturable=True), nn.MSELoss(),
                    StepContext(torch.device("cpu")))


def _tiny(norm: str, amp):
    """A tiny ResNet with ``norm`` at normalization batch 2 in device batch 8 on CUDA; its capturable SGD,
    a per-step schedule, the loss and the step context."""
    recipe = build_norm({"name": norm, **NORM_PARAMS[norm]}, NormContext(norm_batch=2, device_batch=8))
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", recipe, num_classes=10, in_channels=1, depth=8, width=4)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    opt = build_optimizer(model, OPTIM, 0.05, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.2 + 0.1 * i)  # the lr changes every step
    ctx = StepContext(torch.device("cuda"), amp, channels_last=True)
    return model, opt, sched, nn.CrossEntropyLoss(label_smoothing=0.1), ctx


def _run(norm: str, amp, graphed: bool, batches):
    model, opt, sched, criterion, ctx = _tiny(norm, amp)
    step = GraphedStep(model, opt, criterion, ctx) if graphed else eager_step(model, opt, criterion, ctx)
    losses = []
    for it, (x, y) in enumerate(batches):
        probe = step(x.cuda().contiguous(memory_format=torch.channels_last), y.cuda())
        sched.step()
        losses.append(read_probe(probe, opt.param_groups[0]["lr"], it + 1))
    assert not graphed or step.graph is not None
    return losses, model.state_dict(), [opt.state[p]["momentum_buffer"] for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", ["bn", "brn", "mabn"])
def test_cuda_graph_training_equals_eager(norm, amp):
    """Whole-step capture == the same steps run eagerly: losses and lrs per step, weights, every norm buffer
    (counters, rings, running statistics) and the momentum buffers."""
    torch.backends.cudnn.deterministic = True
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=gen) * (1 + i % 3),
                torch.randint(0, 10, (8,), generator=gen)) for i in range(STEPS)]
    eager, graphed = _run(norm, amp, False, batches), _run(norm, amp, True, batches)
    tol = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-3)
    for i, (a, b) in enumerate(zip(eager[0], graphed[0], strict=True)):
        assert a[1] == pytest.approx(b[1], rel=1e-6), f"lr at step {i + 1}"
        assert a[0] == pytest.approx(b[0], rel=tol["rtol"], abs=tol["atol"]), f"loss at step {i + 1}"
    for key, value in eager[1].items():
        if value.is_floating_point():
            torch.testing.assert_close(graphed[1][key], value, **tol, msg=lambda m, k=key: f"{k}: {m}")
        else:  # counters advance exactly
            assert torch.equal(graphed[1][key], value), key
    for a, b in zip(eager[2], graphed[2], strict=True):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GROUPED)
def test_compiled_equals_eager_on_cuda(name):
    """torch.compile (inductor, Triton) == eager on CUDA in float32: outputs, gradients, every buffer."""
    torch._dynamo.reset()
    eager = compile_model(name, 4).float().cuda()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    for call in range(6):
        x = (torch.randn(8, 4, 3, 3, generator=gen) * (0.5 + call % 3) + 0.3 * call).cuda()
        dy = torch.randn(x.shape, generator=gen).cuda()
        outs = []
        for model in (compiled, eager):
            xi = x.clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            model(xi).backward(dy)
            outs.append(xi.grad)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        for (key, b), c in zip(compiled_model.state_dict().items(), eager.state_dict().values(), strict=True):
            torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key, i=call: f"{k}, call {i}: {m}")


@pytest.mark.gpu
def test_entry_script_cuda_graphs_equals_eager(tmp_path, data_root):
    """train_imagenet.py with train.cuda_graphs=true finishes and ends where the eager run ends (float32)."""
    args = ["norm=mabn", "batch=2", "norm.warmup_iters=1", "train.device=cuda", "train.amp=off",
            "train.max_iters_per_epoch=6", "epochs=1"]
    ends = []
    for graphs in ("false", "true"):
        runs = tmp_path / graphs
        train(args + [f"train.cuda_graphs={graphs}"], runs, data_root, timeout=600)
        saved = torch.load(run_dir(runs) / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
        ends.append(saved["model"])
    for key, value in ends[0].items():  # plain SGD (eager) against fused SGD (graphs): rounding apart
        close = dict(rtol=1e-3, atol=1e-4) if value.is_floating_point() else dict(rtol=0, atol=0)
        torch.testing.assert_close(ends[1][key], value, **close, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.gpu
def test_one_process_nccl_under_torchrun(tmp_path, data_root):
    """torchrun with one process on CUDA: the NCCL process group, broadcast of the run state, a checkpoint."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    train(["norm=mabn", "batch=2", "epochs=1", "train.device=cuda"], tmp_path, data_root, launcher=launcher,
          timeout=600)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["status"] == "finished"
    assert summary["device"] and not summary["device"].startswith("CPU")

