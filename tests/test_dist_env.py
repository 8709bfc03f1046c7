"""Rank discovery from torchrun, plain srun and submitit environments (no process group is started)."""

import os

import pytest

from mabn.dist import env_ranks, local_world_size

CLEAR = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"]


@pytest.fixture
def env(monkeypatch):
    saved = dict(os.environ)  # the code under test exports variables itself: restore everything after
    for key in CLEAR + [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_single_process(env):
    assert env_ranks() is None
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "1")
    assert env_ranks() is None  # a one-task SLURM job is a single process


def test_torchrun(env):
    env.setenv("RANK", "3")
    env.setenv("WORLD_SIZE", "8")
    env.setenv("LOCAL_RANK", "1")
    assert env_ranks() == (3, 8, 1)


def test_plain_srun_uses_first_host(env, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho node07\necho node08\n")
    fake.chmod(0o755)
    env.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for key, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
                       "SLURM_JOB_NODELIST": "node[07-08]"}.items():
        env.setenv(key, value)
    assert env_ranks() == (5, 16, 5)
    assert os.environ["MASTER_ADDR"] == "node07" and os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_submitit_job(env):
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                       "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu01",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}.items():
        env.setenv(key, value)
    assert env_ranks() == (1, 2, 1)
    assert os.environ["MASTER_ADDR"] == "gpu01" and os.environ["RANK"] == "1"


def test_local_world_size_from_torchrun_and_slurm(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")  # 2 nodes of 8 tasks
    assert local_world_size() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_world_size() == 4
