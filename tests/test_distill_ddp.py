"""2-rank gloo DDP training equals 1-rank training on the doubled (global) batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vdit_compile.distill import DistillConfig
from vdit_compile.distill.run import run

STEPS = 4


def _cfg(out):
    # global batch 4: one rank sees 4 points, two ranks see 2 each (the same 4, split)
    return DistillConfig.smoke(out, stages="mlcd", mlcd_steps=STEPS, batch_size=4, ckpt_every=100)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        run(_cfg(out), progress=False)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_one_rank_on_the_doubled_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_cfg(one), progress=False)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(two)), nprocs=2, join=True)
    a = load_file(str(one / "mlcd" / "weights.safetensors"))
    b = load_file(str(two / "mlcd" / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # the comparison is meaningful only if training moved the weights
    from vdit_compile.distill.adapter import TinyAdapter

    init = TinyAdapter().transformer.state_dict()
    moved = sum(int(not torch.allclose(a[k], init[k])) for k in a)
    assert moved > len(a) // 2
