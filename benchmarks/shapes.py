"""Synthetic state dicts with the shapes of well-known models (random values, no download).

torchvision is not installable here, so ResNet-50 is built from its published layout.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def _bn(sd: OrderedDict, prefix: str, n: int) -> None:
    """A BatchNorm2d's five tensors, as torchvision's state dict lists them."""
    sd[f"{prefix}.weight"] = torch.rand(n)
    sd[f"{prefix}.bias"] = torch.randn(n) * 0.1
    sd[f"{prefix}.running_mean"] = torch.randn(n) * 0.1
    sd[f"{prefix}.running_var"] = torch.rand(n) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)


def resnet50_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """torchvision's resnet50() state dict shapes: 320 tensors, 25.6M values, 102 MB fp32."""
    torch.manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["conv1.weight"] = torch.randn(64, 3, 7, 7) * 0.05
    _bn(sd, "bn1", 64)
    inplanes = 64
    for layer, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(width, inplanes, 1, 1) * 0.05
            _bn(sd, f"{p}.bn1", width)
            sd[f"{p}.conv2.weight"] = torch.randn(width, width, 3, 3) * 0.05
            _bn(sd, f"{p}.bn2", width)
            sd[f"{p}.conv3.weight"] = torch.randn(width * 4, width, 1, 1) * 0.05
            _bn(sd, f"{p}.bn3", width * 4)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = torch.randn(width * 4, inplanes, 1, 1) * 0.05
                _bn(sd, f"{p}.downsample.1", width * 4)
            inplanes = width * 4
    sd["fc.weight"] = torch.randn(1000, 2048) * 0.02
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def llama_state_dict(
    layers: int = 16,
    hidden: int = 2048,
    intermediate: int = 8192,
    kv: int = 512,
    vocab: int = 32000,
    seed: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """A LLaMA-style decoder in bfloat16 with a tied (unstored) head: 2 + 9 x layers tensors.

    The defaults (Llama-3.2-1B's layer sizes with a 32k vocabulary) give 146 tensors,
    1.04B values, 2.08 GB (1.94 GiB).
    """
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["model.embed_tokens.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.q_proj.weight"] = w(hidden, hidden)
        sd[f"{p}.self_attn.k_proj.weight"] = w(kv, hidden)
        sd[f"{p}.self_attn.v_proj.weight"] = w(kv, hidden)
        sd[f"{p}.self_attn.o_proj.weight"] = w(hidden, hidden)
        sd[f"{p}.mlp.gate_proj.weight"] = w(intermediate, hidden)
        sd[f"{p}.mlp.up_proj.weight"] = w(intermediate, hidden)
        sd[f"{p}.mlp.down_proj.weight"] = w(hidden, intermediate)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return sd


def module_for(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose buffers, zeroed, have the keys, shapes and dtypes of ``state_dict``:
    a target for ``load_state_dict`` / ``load_into`` when the real class is not at hand."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_buffer(leaf, torch.zeros_like(value))
    return root


def small_tensors_state_dict(n: int, values: int = 64, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """``n`` float32 tensors of ``values`` values each (256 bytes at the default), named as a
    deep model's are: the shape of a model whose cost is per tensor, not per byte (MoE
    experts, per-channel scales, many small norms)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(n, values, generator=gen)
    return OrderedDict((f"model.layers.{i // 100}.block.{i % 100}.weight", flat[i].clone()) for i in range(n))
