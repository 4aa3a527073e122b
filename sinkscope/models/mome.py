"""MoME (Mixture of Matryoshka Experts, arXiv 2510.04136) adapters for the frozen LLM of an AVSR model.

In every decoder block, a `MoMEAdapter` runs in parallel to the MLP (or to the attention, or to the whole block):
`N` routed bottleneck experts (Linear -> GELU -> Linear, the up-projection zero-initialised, so that a new model
is exactly the base LLM), `S` shared experts that are always on, and a top-k router. The router is shared by
every compression rate of the Matryoshka rate set (`shared_router: true`, the paper's choice: sequences at a
high rate reuse what was learned at low rates) or one gate per rate.

The adapters are attached with forward hooks on the HF modules (`block.mlp`, `block.self_attn` or the block):
the module tree of the LLM is untouched, peft's LoRA still finds its targets, and the recorder's hooks, which
are registered later, see the outputs with the adapter's contribution (its `mlp_out` is the MLP branch the
residual stream receives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOCATIONS = ("mlp", "attn", "block")


@dataclass
class MoMEConfig:
    experts: int = 4  # routed experts per block
    shared: int = 1  # shared experts per block (always on)
    top_k: int = 2  # routed experts per token
    bottleneck: int = 32  # hidden width of each expert
    shared_router: bool = True  # one router for every rate (false: one per rate)
    location: str = "mlp"  # in parallel to the MLP, to the attention, or to the whole block
    balance: float = 0.01  # weight of the load-balancing loss (Switch Transformer), logged separately

    def check(self) -> None:
        if self.experts < 1 or self.shared < 0 or self.bottleneck < 1:
            raise ValueError(f"mome: experts and bottleneck must be >= 1 and shared >= 0 (got {self.experts}, "
                             f"{self.bottleneck}, {self.shared})")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"mome: top_k must be in [1, experts={self.experts}], not {self.top_k}")
        if self.location not in LOCATIONS:
            raise ValueError(f"mome: location must be one of {list(LOCATIONS)}, not {self.location!r}")
        if self.balance < 0:
            raise ValueError(f"mome: balance must be >= 0, not {self.balance}")


class Expert(nn.Module):
    """A bottleneck adapter, Linear -> GELU -> Linear, whose up-projection starts at zero."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing: `(ids [.., k], gates [.., k], probs [.., N])`; the k gates are the router's softmax
    probabilities of the chosen experts renormalised to sum to 1."""
    probs = logits.float().softmax(dim=-1)
    top, ids = probs.topk(top_k, dim=-1)
    return ids, top / top.sum(dim=-1, keepdim=True), probs


def balance_loss(ids: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load balancing: `N * sum_i f_i * P_i`, with f_i the share of (token, choice) slots
    routed to expert i and P_i the mean router probability of expert i, over the unmasked tokens. It is 1 for
    uniform routing and grows as routing concentrates."""
    n = probs.shape[-1]
    keep = torch.ones(probs.shape[:-1], dtype=torch.bool, device=probs.device) if mask is None else mask.bool()
    p = probs[keep]  # [M, N]
    chosen = F.one_hot(ids[keep], n).float().sum(dim=1)  # [M, N]: how often each expert was chosen per token
    f = chosen.sum(0) / chosen.sum().clamp_min(1.0)
    return n * (f * p.mean(0)).sum()


class MoMEAdapter(nn.Module):
    """The experts and router(s) of one decoder block."""

    def __init__(self, d: int, cfg: MoMEConfig, n_rates: int):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(Expert(d, cfg.bottleneck) for _ in range(cfg.experts))
        self.shared = nn.ModuleList(Expert(d, cfg.bottleneck) for _ in range(cfg.shared))
        self.routers = nn.ModuleList(nn.Linear(d, cfg.experts, bias=False)
                                     for _ in range(1 if cfg.shared_router else n_rates))

    def forward(self, x: torch.Tensor, rate: int = 0) -> tuple[torch.Tensor, dict]:
        """`x [B, T, d]` -> the adapter's output `[B, T, d]` (added to the host module's output) and the routing:
        top-k expert ids and gates `[B, T, k]`, router probabilities `[B, T, N]`."""
        router = self.routers[0 if self.cfg.shared_router else rate]
        ids, gates, probs = route(router(x), self.cfg.top_k)
        every = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, T, N, d]
        picked = every.gather(-2, ids.unsqueeze(-1).expand(*ids.shape, x.shape[-1]))  # [B, T, k, d]
        out = (gates.to(x.dtype).unsqueeze(-1) * picked).sum(dim=-2)
        for expert in self.shared:
            out = out + expert(x)
        return out, {"ids": ids, "gates": gates, "probs": probs}


class MoMELayers(nn.Module):
    """One adapter per decoder block, attached to the LLM with forward hooks. Set `rate` and `mask` before a
    forward; after it, `routing[layer]` holds that block's routing and `balance()` the mean balancing loss."""

    def __init__(self, blocks: nn.ModuleList, d: int, cfg: MoMEConfig, n_rates: int):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.adapters = nn.ModuleList(MoMEAdapter(d, cfg, n_rates) for _ in blocks)
        self.rate, self.mask = 0, None
        self.routing: dict[int, dict] = {}
        self._handles = [self._attach(i, block) for i, block in enumerate(blocks)]

    def _attach(self, i: int, block: nn.Module):
        host = {"mlp": block.mlp, "attn": block.self_attn, "block": block}[self.cfg.location]

        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            extra, routing = self.adapters[i](x, self.rate)
            self.routing[i] = routing
            if isinstance(output, tuple):
                return (output[0] + extra, *output[1:])
            return output + extra

        return host.register_forward_hook(hook, with_kwargs=True)

    def balance(self) -> torch.Tensor:
        losses = [balance_loss(r["ids"], r["probs"], self.mask) for r in self.routing.values()]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def active_parameters(self) -> int:
        """Trainable parameters one token uses: top-k routed experts, the shared experts and its router."""
        adapter = self.adapters[0]
        expert = sum(p.numel() for p in adapter.experts[0].parameters())
        router = sum(p.numel() for p in adapter.routers[0].parameters())
        return len(self.adapters) * (expert * (self.cfg.top_k + self.cfg.shared) + router)
