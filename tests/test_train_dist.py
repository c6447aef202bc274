"""Two CPU processes (torch.distributed, gloo) train the same model as one process: DDP and FSDP2."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from test_train import cfg_for, make_model_dir  # noqa: E402

from matq_train.torch.trainer import train  # noqa: E402

KW = dict(
    bits=(8, 4, 2),
    lambdas=(0.2, 0.2, 1.0),
    distill="8->2",
    steps=3,
    batch_size=4,
    save_every=3,
    group_size=16,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in ("ddp", "fsdp"):
            train(
                cfg_for(
                    Path(model_dir),
                    Path(root) / f"{mode}-out",
                    checkpoint_dir=str(Path(root) / mode),
                    fsdp=mode == "fsdp",
                    **KW,
                )
            )
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_same_model_as_one(tmp_path):
    import torch.multiprocessing as mp

    model_dir = make_model_dir(tmp_path)
    one = train(cfg_for(model_dir, tmp_path / "one-out", checkpoint_dir=str(tmp_path / "one"), **KW))
    mp.spawn(_worker, args=(2, _free_port(), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    ref = {k: v.numpy() for k, v in one.model.state_dict().items()}
    for mode in ("ddp", "fsdp"):
        got = load_file(str(tmp_path / mode / "step-3" / "model.safetensors"))
        assert set(got) == set(ref), mode
        for k in ref:
            # same global batch, gradients averaged: equal up to float summation order
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=2e-5, err_msg=f"{mode} {k}")
        assert (tmp_path / f"{mode}-out" / "matq.safetensors").exists()
    # the loss logged by rank 0 is the global loss, as one process sees it
    assert one.history[-1]["widths"]
