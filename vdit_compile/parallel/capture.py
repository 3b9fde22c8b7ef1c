"""``parallelize(module, parallel)``: run any captured module sequence-parallel.

``vdit_compile.optimize(..., parallel=Parallel(...))`` runs the sequence-parallel pass after
the tile rewrite through the core's pass registry; this helper is the same pass on its own,
for a module whose graph already holds ``vdit::tile_attention`` calls or plain SDPA (dense
self-attention is then parallelised as a dense tile).  Graphs run eagerly after the pass
(the parallel attention calls torch.distributed collectives, which inductor would not trace).
"""
from __future__ import annotations

import torch

from .graph_pass import shard_graph


def parallel_backend(parallel, sites=None, inner=None):
    """A torch.compile backend: shard each Dynamo graph for ``parallel``, then run ``inner`` (eager)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        if inner is not None:
            gm = inner(gm, example_inputs)
        gm = shard_graph(gm, parallel, sites=sites, example_inputs=example_inputs)
        return gm.forward

    return backend


def parallelize(module: torch.nn.Module, parallel, sites=None, inner=None):
    """``module`` compiled so that its forward runs sharded by frames across ``parallel``'s ranks."""
    return torch.compile(module, backend=parallel_backend(parallel, sites, inner), dynamic=False)
