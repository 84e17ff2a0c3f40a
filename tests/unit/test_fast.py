"""The GPU speed path's pieces, checked on CPU against the plain computation."""

import os

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


def test_deterministic_kernels_are_strict_and_fix_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        fast.deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # a warning would leave atomics on
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
