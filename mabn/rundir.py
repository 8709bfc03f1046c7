"""One run per directory: claim a run directory before anything is built, or refuse to mix two runs in it.

A run directory holds the records (metrics.jsonl, summary.json, traces) and checkpoints of exactly one run,
named by ``run.json`` (the settings that make it that run). A start finds one of: an empty directory (a new
run), the same run with a checkpoint (resume), the same run without one (an earlier start died before its
first checkpoint: its records cannot match any checkpoint and are discarded, with a notice), or another run
(refused, naming the directory and the settings that differ, unless ``run.overwrite=true`` deletes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .config import ConfigError
from .records import git_sha

RUN_FILE = "run.json"
LOCK_FILE = ".run.lock"  # held (flock) by the process training the run; the kernel drops it however that ends
RECORD_FILES = ("metrics.jsonl", "summary.json", "diag_batch_stats.jsonl", "wandb_id.txt")
# a run's identity: change any of these and it is another run (its checkpoint cannot continue it)
IDENTITY = ("norm", "batch", "batch_mode", "model", "seed", "data.name", "data.batch_size", "data.num_classes",
            "data.image_size", "data.train_json", "data.val_json", "solver")


def _get(cfg: dict, key: str):
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def identity(cfg: dict) -> dict:
    """The settings that name a run (absent keys, e.g. detection's solver in classification, are left out;
    ``norm.impl`` too: the fused and reference paths compute the same and share their state)."""
    found = {k: _get(cfg, k) for k in IDENTITY if _get(cfg, k) is not None}
    if isinstance(found.get("norm"), dict):
        found["norm"] = {k: v for k, v in found["norm"].items() if k != "impl"}
    return found


def identity_differences(owner: dict, me: dict) -> list[str]:
    """How ``me`` differs from the run that owns a directory. A setting the owner's record lacks came with a
    later version of the code, at its default then: it does not make another run."""
    a, b = _flat(owner), _flat(me)
    return [f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in sorted(a) if a[k] != b.get(k)]


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir/checkpoints`` and write a probe file there: a read-only disk fails now, not at the
    first checkpoint an epoch later."""
    probe = run_dir / "checkpoints" / f".write-probe-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run.dir={run_dir} is not writable ({err.strerror}: {err.filename}); choose another "
                          f"run.dir or MABN_RUNS") from err


def run_files(run_dir: Path) -> list[Path]:
    """The files a run leaves in its directory (Hydra's own hydra/ folder and log are not among them)."""
    found = [run_dir / f for f in (RUN_FILE, *RECORD_FILES) if (run_dir / f).exists()]
    ckpt = run_dir / "checkpoints"
    return found + sorted(p for p in ckpt.iterdir() if not p.name.startswith(".write-probe")) if ckpt.is_dir() \
        else found


def _delete(run_dir: Path, files: list[Path]) -> None:
    for path in files:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def claim(run_dir: Path, cfg: dict, *, has_checkpoint: bool, resume: bool, overwrite: bool,
          checkpoint_config: dict | None = None, unreadable: list[str] = ()) -> list[str]:
    """Make ``run_dir`` this run's, or raise ConfigError; returns the notices to print.

    ``has_checkpoint``: a readable checkpoint of this directory exists (``checkpoint_config`` its config);
    ``unreadable``: why each newer checkpoint file could not be read."""
    run_dir.mkdir(parents=True, exist_ok=True)
    notices = hold(run_dir)
    files, me = run_files(run_dir), identity(cfg)
    if files and overwrite:
        _delete(run_dir, files)
        notices.append(f"run.overwrite=true: deleted the earlier run's files in {run_dir}")
    elif files:
        owner_file = run_dir / RUN_FILE
        owner = json.loads(owner_file.read_text())["identity"] if owner_file.exists() else \
            identity(checkpoint_config) if checkpoint_config is not None else None
        if owner is None:
            names = ", ".join(p.name for p in files[:4])
            raise ConfigError(f"run.dir={run_dir} holds files of an unknown run ({names}); "
                              f"choose another run.name or run.dir, or set run.overwrite=true to delete them")
        if identity_differences(owner, me):
            raise ConfigError(f"run.dir={run_dir} holds another run "
                              f"({'; '.join(identity_differences(owner, me)[:4])}); "
                              f"choose another run.name or run.dir, or set run.overwrite=true to delete it")
        if has_checkpoint and not resume:
            raise ConfigError(f"run.dir={run_dir} holds this run's checkpoint; rerun without run.resume=false to "
                              f"continue it, or set run.overwrite=true to delete it and start over")
        if not has_checkpoint and unreadable:
            raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'} can be read ({'; '.join(unreadable)}); "
                              f"move them away to start this run over, or set run.overwrite=true to delete them")
        if not has_checkpoint:
            stale = [p for p in files if p.name != RUN_FILE]
            _delete(run_dir, stale)
            if stale:
                notices.append(f"{run_dir} has no checkpoint: the records of an earlier start that never "
                               f"checkpointed are discarded ({', '.join(p.name for p in stale)}); starting over")
    return notices


# the run directories this process holds, until its job ends (release): {resolved path: lock file descriptor}
_HELD: dict[Path, int] = {}


def hold(run_dir: Path) -> list[str]:
    """Make this process the only one training ``run_dir`` until ``release``, or raise ConfigError naming the
    process that trains it (a sweep submitted twice, a cell started by hand beside its sweep: both would
    write the same checkpoints and records). Returns a notice where the file system has no locks."""
    key = run_dir.resolve()
    if key in _HELD:
        return []
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"run.dir={run_dir} is in use by {holder}: one process trains a run at a time; let "
                          f"it finish, or stop it (a rerun resumes from its checkpoint), or choose another "
                          f"run.name") from None
    except OSError as err:  # e.g. a Lustre mount without -o flock
        os.close(fd)
        return [f"run.dir={run_dir}: its file system cannot lock files ({err.strerror}); a second start of "
                f"this run while this one trains would not be refused"]
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
             .encode())
    _HELD[key] = fd
    return []


def release() -> None:
    """Let go of every run directory this process holds (its job is over; the next cell of a multirun in the
    same process claims its own)."""
    while _HELD:
        fd = _HELD.popitem()[1]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def recorded_config(run_dir: Path) -> dict | None:
    """The resolved config of the last start that claimed ``run_dir`` (None for none, or an older record)."""
    path = run_dir / RUN_FILE
    return json.loads(path.read_text()).get("config") if path.exists() else None


# run directories this process claimed afresh (no run.json before): a config error found later, while
# building, leaves nothing of such a claim behind (mabn.entry.config_failure)
FRESH_CLAIMS: set[Path] = set()


def begin(run_dir: Path, cfg: dict, *, resuming: bool, composed=None, overrides: list[str] | None = None) -> None:
    """After every check passed: run.json says whose directory this is and with which config this start
    runs; a resumed run's summary.json (how its last start ended) goes, since this start writes its own.
    ``composed`` (the Hydra config as composed) goes to hydra/config.yaml, and the command line's overrides
    (``overrides``, else Hydra's own where this process has them) to hydra/overrides.yaml: written here,
    not by Hydra before the job starts (``hydra.output_subdir: null``), so a start refused for another run's
    directory leaves that run's files as they were."""
    if resuming and (run_dir / "summary.json").exists():
        (run_dir / "summary.json").unlink()
    if not (run_dir / RUN_FILE).exists():
        FRESH_CLAIMS.add(run_dir.resolve())
    else:
        FRESH_CLAIMS.discard(run_dir.resolve())
    record_config(run_dir, cfg, resuming=resuming)
    if composed is not None:
        _write_hydra_files(run_dir, composed, overrides)


def hydra_overrides() -> list[str] | None:
    """The command line's overrides, where Hydra runs in this process (not in processes detectron2's
    launch() spawned: their parent reads them and hands them over)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def _write_hydra_files(run_dir: Path, composed, overrides: list[str] | None) -> None:
    from omegaconf import OmegaConf

    (run_dir / "hydra").mkdir(exist_ok=True)
    files = {"config.yaml": OmegaConf.to_yaml(composed)}
    overrides = overrides if overrides is not None else hydra_overrides()
    if overrides is not None:
        files["overrides.yaml"] = OmegaConf.to_yaml(list(overrides))
    for name, text in files.items():
        tmp = run_dir / "hydra" / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / "hydra" / name)


def record_config(run_dir: Path, cfg: dict, *, resuming: bool = False) -> None:
    """Write run.json: the run's identity, when it was created, the config of this start and every start's
    commit (a run resumed after a ``git pull`` trained on more than one; a fresh start begins the list again).
    An earlier start that predates this list is kept as a start of unknown commit."""
    path = run_dir / RUN_FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    earlier = old.get("starts", [{"started": None, "git_sha": None}]) if resuming else []  # a checkpoint: ran
    # a start is "trained" once its first step has run (mark_trained); until then it says so, and a start that
    # fails before its first step says why (mark_failed)
    record = {"identity": identity(cfg), "created": old.get("created", now), "config": cfg,
              "starts": earlier + [{"started": now, "git_sha": git_sha(), "trained": False}]}
    _write_run_file(path, record)


def _write_run_file(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _update_last_start(run_dir: Path, **fields) -> None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    if record.get("starts"):
        record["starts"][-1].update(fields)
        _write_run_file(path, record)


def mark_trained(run_dir: Path) -> None:
    """This start's first step has run: run.json records it as a start that trained."""
    _update_last_start(run_dir, trained=True)


def mark_failed(run_dir: Path, reason: str) -> None:
    """This start ended before its first step: run.json says why (a start that trained keeps its record)."""
    path = Path(run_dir) / RUN_FILE
    if path.is_file():
        starts_ = json.loads(path.read_text()).get("starts") or [{}]
        if starts_[-1].get("trained") is False:
            _update_last_start(run_dir, failed=reason)


def trained_starts(run_dir: Path) -> list[dict]:
    """The starts that ran at least one step (records from before the flag count as trained)."""
    return [s for s in starts(run_dir) if s.get("trained", True)]


def starts(run_dir: Path) -> list[dict]:
    """The starts run.json records for ``run_dir`` ({started, git_sha}; None where not recorded)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()).get("starts", []) if path.exists() else []


# what the optimizer's state dict brings back (its param groups' hyper-parameters; the lr from these):
# a change needs run.allow_changes
RESTORED = tuple(f"optim.{k}" for k in ("lr", "base_lr", "base_batch", "momentum", "weight_decay",
                                         "norm_weight_decay", "nesterov"))
UNRECORDED = ("run.", "logger.", "launcher.", "hydra.", "train.progress", "train.stop_after_iters", "data.root",
              "data.workers")  # where a run runs and how it reports: free to change on any resume


def resume_changes(saved: dict, current: dict, allowed, iteration: int | None, *, can_apply: bool = True
                   ) -> list[dict]:
    """The settings a resume changes, to record; a change the checkpoint would silently undo (the optimizer's
    hyper-parameters) is refused unless ``allowed`` (run.allow_changes) names it — and always where the entry
    script cannot apply it (``can_apply=False``: detectron2's checkpointer restores the lr schedule)."""
    a, b = _flat(saved), _flat(current)
    # a setting the saved config lacks came with a later version of the code, at its default then: no change
    keys = [k for k in sorted(a) if a[k] != b.get(k) and not k.startswith(UNRECORDED)]
    blocked = [k for k in keys if k in RESTORED and (not can_apply or k not in set(allowed or ()))]
    if blocked:
        shown = ", ".join(f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in blocked)
        how = (f"to apply the new one from iteration {iteration}, add run.allow_changes=[{','.join(blocked)}], "
               f"or start another run with another run.name" if can_apply else
               "this entry script cannot apply it to a resumed run: start another run with another run.name")
        raise ConfigError(f"the checkpoint restores {shown}: resuming would silently keep the checkpoint's "
                          f"value; {how}")
    return [{"iter": iteration, "key": k, "old": a.get(k), "new": b.get(k)} for k in keys]


def lr_change(saved, lr: float, allowed) -> list[dict]:
    """The lr the optimizer state of ``saved`` (a mabn.checkpoint.Checkpoint) restores against the one this
    start computes: with optim.lr null the lr follows the SGD batch (linear scaling), so resuming on another
    number of devices or another data.batch_size changes it without any optim.* key changing."""
    restored = saved.payload["optimizer"]["param_groups"][0].get("initial_lr")
    if restored is None or abs(float(restored) - lr) <= 1e-12 * lr:
        return []
    if "optim.lr" not in set(allowed or ()):
        raise ConfigError(f"the checkpoint restores lr {float(restored):g}, but this start computes lr {lr:g} "
                          f"(another SGD batch: devices or data.batch_size); add run.allow_changes=[optim.lr] to "
                          f"apply {lr:g} from iteration {saved.iteration}, or resume as the run was started")
    return [{"iter": saved.iteration, "key": "lr", "old": float(restored), "new": lr}]
