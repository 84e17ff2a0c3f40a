"""The GPU speed path's pieces, checked on CPU against the plain computation."""

import torch
import torch.nn.functional as F

from lora_launch.train import fast


def test_loss_matches_shifted_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 9, 30), torch.randint(0, 30, (2, 9))
    labels[0, :4] = -100
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert torch.allclose(fast.loss_function("none")(logits, labels), want)
