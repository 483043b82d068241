"""Build local heads (DESIGN §1, "Local head"): one predictor per inner boundary 1..N-1.

Heads map ``h_i`` to the model output's shape so the task loss can score it: pooling plus a linear
layer for images, a linear layer for token sequences and vectors. They are built when the objective
is ``"dgl"``, or under ``"hbll"`` when ``config.head_weight > 0`` (the default ``local_head_weight=0``
builds none). Under ``"hbll"`` with ``local_head_weight=None`` a boundary no head fits gets none (its
block trains on the path loss alone); an explicit weight, or ``"dgl"``, needs a head at every inner
boundary.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4, config=hc.HBLLConfig(objective="dgl"))
    >>> sorted(m.heads)
    ['1', '2', '3']
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import LoweringError
from hbll_compile.ir import Boundary
from hbll_compile.nn.heads import make_head

__all__ = ["build_heads", "wants_heads"]

log = logging.getLogger(__name__)


def wants_heads(config: HBLLConfig) -> bool:
    return config.objective == "dgl" or (config.objective == "hbll" and config.head_weight > 0)


def build_heads(boundaries: list[Boundary], config: HBLLConfig) -> nn.ModuleDict:
    """Heads keyed by ``str(i)`` for boundaries 1..N-1 (empty when the config needs none).

    Raises:
        LoweringError: no head maps a boundary's shape to the output's (see
            :func:`~hbll_compile.nn.heads.make_head`) and the config asks for heads everywhere.
    """
    optional = config.objective == "hbll" and config.local_head_weight is None
    heads = nn.ModuleDict()
    if not wants_heads(config):
        return heads
    output = boundaries[-1].shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        for boundary in boundaries[1:-1]:
            try:
                heads[str(boundary.index)] = make_head(boundary.shape, output)
            except ValueError as err:
                if optional:
                    log.debug("heads: no local head at boundary %d (%s): %s", boundary.index, boundary.node, err)
                    continue
                raise LoweringError(f"cannot build a local head at boundary {boundary.index}: {err}",
                                   node=boundary.node,
                                   remedy="set local_head_weight=0 (objective 'hbll'), or choose another block count"
                                   ) from err
    return heads
