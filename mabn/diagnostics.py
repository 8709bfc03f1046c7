"""The papers' analyses: batch-statistics noise during training (MABN) and estimation shift (XBNBlock).

Batch statistics (Yan et al. 2020, Sec. 3): vanilla BN uses four statistics of the normalization batch,
μ_B and σ²_B in the forward pass and g_B = mean(ĝ), Ψ_B = mean(ĝ·x̂) (ĝ = γ·∂L/∂y) in the backward pass; the
MABN paper's point is that at small n the backward ones are as noisy as the forward ones. The tracer measures
all four at every batch-dependent layer's input, whatever the norm, against population estimates.

Estimation shift: the gap between a batch-dependent norm's estimated population statistics (its running
averages, what inference uses) and the expected ones (the statistics of the training data under the final
weights, recomputed PreciseBN-style). The XBNBlock paper's claim is that it accumulates with depth through
stacked BN layers; a batch-free norm in the block stops the accumulation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .checkpoint import read as read_checkpoint
from .config import plan_batches
from .data import dataset_spec
from .models import build_model
from .norms import NormContext, batch_dependent_types, build_norm, norm_types, protocol
from .precise_bn import recompute_norm_stats


@torch.no_grad()
def estimation_shift(model: nn.Module, batches, device: torch.device) -> list[dict]:
    """Per batch-dependent norm layer, with its depth among all norm layers (registration order, which is
    forward order for the registry's ResNets: stem, blocks, a block's shortcut last): the distance between
    its running statistics and
    those recomputed over ``batches`` with the model's weights (the model itself is left unchanged).

    ``mean_l2``/``var_l2``: ‖running − recomputed‖₂ over channels (the paper's measure); ``mean_rel``: mean
    over channels of |Δμ| / σ_recomputed; ``var_rel``: mean over channels of |log(σ²_running / σ²_recomputed)|
    (scale-free, comparable across layers). MABN has no mean: its statistic is the second moment χ².
    """
    recomputed = copy.deepcopy(model)
    recompute_norm_stats(recomputed, batches, device)
    # depth counts every norm layer (batch-free ones too), so XBNBlock and plain models line up
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, norm_types())]
    rows = []
    for depth, (name, old) in enumerate(norms):
        if not isinstance(old, batch_dependent_types()):
            continue
        before, after = protocol.population(old), protocol.population(recomputed.get_submodule(name))
        if not before:
            continue
        eps = getattr(old, "eps", 1e-5)
        key = "var" if "var" in before else "second_moment"  # MABN's statistic stands where BN's variance does
        v_old, v_new = before[key].double(), after[key].double()
        row = {"depth": depth, "layer": name, "type": type(old).__name__, "channels": v_old.numel(),
               "var_l2": float((v_old - v_new).norm()),
               "var_rel": float(((v_old + eps) / (v_new + eps)).log().abs().mean())}
        if "mean" in before:
            m_old, m_new = before["mean"].double(), after["mean"].double()
            row["mean_l2"] = float((m_old - m_new).norm())
            row["mean_rel"] = float(((m_old - m_new).abs() / (v_new + eps).sqrt()).mean())
        rows.append(row)
    return rows


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, DictConfig, NormContext]:
    """Rebuild a train_imagenet.py model from its checkpoint (the resolved config is saved in it), with the
    run's batch plan (device batch, normalization batch)."""
    saved = read_checkpoint(path)
    cfg = OmegaConf.create(saved.config)
    plan = plan_batches(cfg)
    recipe = build_norm(saved.config["norm"], plan.norm_context())
    options = {k: v for k, v in saved.config["model"].items() if k != "name"}
    model = build_model(cfg.model.name, recipe, num_classes=cfg.data.num_classes,
                        in_channels=dataset_spec(cfg.data.name, "classification").in_channels, **options)
    model.load_state_dict(saved.payload["model"])
    return model, cfg, plan


STATS = ("mu", "var", "g", "psi")


def batch_statistics(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, group_size: int | None,
                     eps: float) -> dict[str, torch.Tensor]:
    """Vanilla BN's four statistics per normalization batch, each (G, C): μ_B, σ²_B (biased), g_B = mean(ĝ)
    and Ψ_B = mean(ĝ·x̂), with ĝ = γ·dy and x̂ = (x − μ_B)/√(σ²_B + ε); and rms (G, C), the root mean square
    of ĝ, which the backward deviations are measured in."""
    n = group_size or x.shape[0]
    g = x.shape[0] // n
    xg = x.reshape(g, n, x.shape[1], -1).double()
    ghat = dy.reshape(xg.shape).double()
    if weight is not None:
        ghat = ghat * weight.detach().double().view(1, 1, -1, 1)
    var, mu = torch.var_mean(xg, dim=(1, 3), correction=0, keepdim=True)
    xhat = (xg - mu) / torch.sqrt(var + eps)
    return {"mu": mu[:, 0, :, 0], "var": var[:, 0, :, 0], "g": ghat.mean(dim=(1, 3)),
            "psi": (ghat * xhat).mean(dim=(1, 3)), "rms": ghat.square().mean(dim=(1, 3)).sqrt(),
            "x2": xg.square().mean(dim=(1, 3))}


USED = ("chi2_bar", "psi_bar", "r")  # what MABN normalizes with (Yan et al. 2020, Alg. 1-2)


class BatchStatsTracer:
    """Records the four batch statistics of every batch-dependent norm layer on armed steps (``arm``).

    Each record (a line of ``path``, JSON) holds, per layer and traced step, the channel means of μ_B, σ²_B,
    g_B, Ψ_B and their deviations from population estimates, averaged over channels and normalization
    batches: ``mu_dev`` = |μ_B − μ|/√(σ²+ε) and ``var_dev`` = |σ²_B/σ² − 1| against the layer's running
    statistics where it keeps them (bn, brn, syncbn; for MABN, whose running statistic is the second moment,
    against the tracer's own averages); ``g_dev`` and ``psi_dev`` = |s_B − s̄|/rms(ĝ) against the average
    of that statistic over every traced batch so far. Nothing is hooked until the tracer is built, and
    ``close`` removes every hook.

    MABN layers also report what they normalize with (``USED``): the channel means of χ̄², Ψ̄ and r, and
    ``chi2_bar_dev`` = |χ̄²/χ² − 1| and ``psi_bar_dev`` = |Ψ̄ − Ψ|/rms(ĝ) (ĝ = r·γ·dy, the layer's), the
    measures of var_dev and psi_dev against the same kind of reference: the average over every traced
    batch so far of the statistic's own batch value, χ²_B = mean(x²) and the layer's Ψ_t (a second moment
    is not measured against a variance, which would count μ² as noise). The layer hands them over by
    reference on traced steps only (``MABN2d.used_stats``); they are read once its backward has run.
    """

    def __init__(self, model: nn.Module, path: Path | None, *, enabled: bool = True):
        self.path, self.enabled, self.armed, self.iteration = path, enabled, False, 0
        self.records: list[dict] = []
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._counts: dict[str, int] = {}
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, batch_dependent_types())]
        self._depth = {n: i for i, (n, _) in enumerate(layers)}
        self._used_sums: dict[str, dict[str, torch.Tensor | int]] = {}
        self._mabn = [m for _, m in layers if protocol.reports_used_statistics(m)]
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in layers]

    def arm(self, active: bool, iteration: int) -> None:
        """Trace the next training step (numbered ``iteration``) or not; ``records`` keeps the last traced
        step's records only (the file keeps all)."""
        if active:
            self.records = []
        self.armed, self.iteration = active, iteration
        for m in self._mabn:  # a dict: the layer files references to its statistics into it; None: nothing
            m.used_stats = {} if active else None

    def state_dict(self) -> dict:
        """The running averages the deviations are measured against (a resumed run continues them)."""
        return {"sums": self._sums, "counts": dict(self._counts), "used_sums": self._used_sums}

    def load_state_dict(self, state: dict) -> None:
        self._sums, self._counts = state["sums"], dict(state["counts"])
        self._used_sums = state["used_sums"]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._mabn:
            m.used_stats = None

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not (self.armed and module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            if x.shape[0] == 0:
                return
            output.register_hook(lambda dy: self._on_grad(name, module, x, dy.detach()))

        return hook

    def _on_grad(self, name: str, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        if getattr(module, "used_stats", None) is None:
            self._record(name, module, x, dy)
        else:  # MABN's Ψ̄ exists once the layer's backward has run: record at the end of this backward pass
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: self._record(name, module, x, dy))

    def _used(self, name: str, module: nn.Module, stats: dict[str, torch.Tensor], eps: float) -> dict:
        """MABN: the channel means of χ̄², Ψ̄ and r of this call and their deviations (see the class)."""
        sink = getattr(module, "used_stats", None) or {}
        if "psi_bar" not in sink:  # not a MABN layer, or a call that did not hand them over (compiled)
            return {}
        used = {k: sink[k].detach().double() for k in ("chi2_bar", "psi", "psi_bar", "r")}
        sums = self._used_sums.setdefault(name, {"x2": 0.0, "psi": 0.0, "count": 0})
        _to_device(sums, stats["x2"].device)
        sums["x2"] = sums["x2"] + stats["x2"].sum(dim=0)
        sums["psi"] = sums["psi"] + used["psi"].sum(dim=0)
        sums["count"] += stats["x2"].shape[0]
        ref_x2, ref_psi = sums["x2"] / sums["count"], sums["psi"] / sums["count"]
        rms = (used["r"].abs() * stats["rms"]).clamp_min(1e-30)  # rms(r·γ·dy): r is constant per group
        return {**{k: float(used[k].mean()) for k in USED},
                "chi2_bar_dev": float((used["chi2_bar"] / (ref_x2 + eps) - 1).abs().mean()),
                "psi_bar_dev": float(((used["psi_bar"] - ref_psi).abs() / rms).mean())}

    @torch.no_grad()
    def _record(self, name: str, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        eps = getattr(module, "eps", 1e-5)
        stats = batch_statistics(x, dy, getattr(module, "weight", None), getattr(module, "group_size", None), eps)
        sums = self._sums.setdefault(name, {k: torch.zeros_like(stats[k][0]) for k in STATS})
        _to_device(sums, stats["mu"].device)  # a checkpoint's averages come back on the CPU
        for k in STATS:
            sums[k] += stats[k].sum(dim=0)
        self._counts[name] = self._counts.get(name, 0) + stats["mu"].shape[0]
        mean = {k: sums[k] / self._counts[name] for k in STATS}
        running = protocol.population(module)
        has_running = "mean" in running
        ref_mu = running["mean"].double() if has_running else mean["mu"]
        ref_var = running["var"].double() if has_running else mean["var"]
        rms = stats["rms"].clamp_min(1e-30)
        record = {"iter": self.iteration, "layer": name, "depth": self._depth[name], "type": type(module).__name__,
                  "n": x.shape[0] // stats["mu"].shape[0], "groups": stats["mu"].shape[0],
                  **{k: float(stats[k].mean()) for k in STATS},
                  "mu_dev": float(((stats["mu"] - ref_mu).abs() / torch.sqrt(ref_var + eps)).mean()),
                  "var_dev": float((stats["var"] / (ref_var + eps) - 1).abs().mean()),
                  "g_dev": float(((stats["g"] - mean["g"]).abs() / rms).mean()),
                  "psi_dev": float(((stats["psi"] - mean["psi"]).abs() / rms).mean()),
                  **self._used(name, module, stats, eps)}
        self.records.append(record)
        if self.enabled and self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _to_device(sums: dict, device: torch.device) -> None:
    for key, value in sums.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            sums[key] = value.to(device)
