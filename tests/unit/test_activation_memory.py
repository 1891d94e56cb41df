"""The activation-memory measurement sees what it should, on a model whose answer is known."""

import pytest
import torch
import torch.nn as nn

from workloads.activation_checkpointing import ACMode, apply_activation_checkpointing
from workloads.activation_memory import ActivationMemory

B, W, D, L = 64, 256, 4, 8  # batch, width, sublayers per block, blocks
ONE = B * W * 4  # bytes of one float32 activation of one layer


class Stack(nn.Module):
    """L blocks of D (Linear, GELU) pairs. Without checkpointing each pair keeps two
    activations for backward (the Linear's input, the GELU's input); with full checkpointing
    a block keeps only its input."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*[m for _ in range(D) for m in (nn.Linear(W, W), nn.GELU())])
            for _ in range(L))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def kept_bytes(mode: str) -> int:
    torch.manual_seed(0)
    model = Stack()
    apply_activation_checkpointing(model.blocks, ACMode.parse(mode))
    x = torch.randn(B, W, requires_grad=True)
    with ActivationMemory() as mem:
        loss = model(x)
    loss.backward()  # the kept activations were really needed: backward works
    return mem.live_bytes


def test_without_checkpointing_every_layer_activation_is_kept():
    assert kept_bytes("none") >= 2 * D * L * ONE


def test_full_checkpointing_keeps_about_one_activation_per_block():
    full = kept_bytes("full")
    assert L * ONE <= full <= (L + 2) * ONE
    # The factor the block structure implies is 2*D; require at least D.
    assert kept_bytes("none") / full >= D


def test_every_second_block_sits_halfway():
    none, half, full = kept_bytes("none"), kept_bytes("every_n:2"), kept_bytes("full")
    assert full < half < none
    assert abs(half - (none + full) / 2) <= 0.1 * none


def test_selective_on_matmuls_keeps_what_they_produce():
    """Keeping matmul outputs (the GELU inputs) but recomputing GELU keeps D per block plus
    the block input: between full and none."""
    sel = kept_bytes("selective:matmul")
    assert kept_bytes("full") < sel < kept_bytes("none")
    assert sel >= D * L * ONE


@pytest.mark.parametrize("mode", ["none", "full"])
def test_forward_outputs_alone_are_not_counted_as_freed(mode):
    with ActivationMemory() as mem:
        y = torch.randn(B, W) * 2
    assert mem.live_bytes == ONE and mem.created_bytes >= 2 * ONE
    del y
