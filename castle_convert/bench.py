"""Cost measurement: MACs with torch.utils.flop_counter (latency benchmarks build on this)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from castle_convert import adapters


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2), counted by torch.utils.flop_counter.

    Works on meta-device models and inputs (shapes only). Counts matmuls, convolutions and
    attention kernels; elementwise ops and normalisations are not counted.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            adapters.forward(model, inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
