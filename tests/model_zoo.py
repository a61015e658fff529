"""Small models of the kinds users log: a CNN with BatchNorm buffers, a transformer with tied
embeddings, a model with several inputs. Importable by fresh processes via code_paths."""

from __future__ import annotations

import torch


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TwoInputs(torch.nn.Module):
    """forward(a, b): the dict-of-arrays pyfunc input (mlflow#13931)."""

    def __init__(self):
        super().__init__()
        self.fa = torch.nn.Linear(3, 4)
        self.fb = torch.nn.Linear(2, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) * self.fb(b)


def tiny_gpt2():
    """GPT-2 with tied input/output embeddings, from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(config).eval()


def trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic non-default weights and buffers, so a load that misses anything shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dtype == torch.int64:
                t.fill_(seed + 7)
    return model.eval()
