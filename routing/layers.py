"""Stacked multi-adapter layers: the tensors and kernels behind `routing.engine`.

Two building blocks, both holding the weights of MANY adapters stacked along a leading
"slot" axis and applying a different adapter (or a weighted blend of adapters) to every row
of a batch with a handful of batched tensor ops, whatever the number of adapters:

- `StackedLoraLinear` replaces a targeted `nn.Linear` (or bitsandbytes `Linear4bit`) and keeps
  it as `base_layer`. It holds `lora_A` [n_slots, r_max, in] and `lora_Bt` [n_slots, r_max, out]
  (B transposed, with the adapter's scaling alpha/r or alpha/sqrt(r) folded in; ranks below
  r_max are zero-padded, which adds exact zeros). For a batch whose row b is routed to slots
  idx[b, :k] with weights w[b, :k]:

      h[b]     = x[b] @ concat_j A[idx[b, j]]^T              bmm   [T, k*r]
      h[b, j] *= w[b, j]                                      broadcast
      y[b]     = base(x)[b] + h[b] @ concat_j Bt[idx[b, j]]  bmm   [T, out]

  i.e. y[b] = base(x[b]) + sum_j w[b, j] * s_j * B_j A_j x[b]: the gather + batched-matmul
  ("BGMV") formulation of Punica (Chen et al. 2023, arXiv:2310.18547) and S-LoRA
  (Sheng et al. 2023, arXiv:2311.03285), done with plain `torch.bmm` instead of custom
  kernels. It needs no grouping of rows by adapter, so its cost does not grow with the
  number of distinct adapters in a batch. Rows with weight 0 get an exact zero delta, so a
  base-routed row equals the bare base bit for bit.

- `StackedBottleneck` is a forward hook on a sublayer module (an MLP or attention block) for
  bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021,
  arXiv:2005.00247). With stacked `down` [n, b_max, H], `up_t` [n, b_max, H] (scaling folded
  in) and biases, it replaces the block output o by
  o + sum_j w[b, j] * (up_j(act_j(down_j(o))) ), with the same gather + bmm scheme.

Which slots and weights each row uses is not stored in the layers: every layer reads the
current batch's `KindRouting` from a shared `RoutingContext` that the engine fills once per
forward pass, so a layer costs one attribute read when its kind is unused in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
}


@dataclass
class KindRouting:
    """How the current batch uses the adapters of one kind.

    mode "off": no row uses this kind (layers return the base output untouched);
    "single": every row uses slot `slot` with the same weight `weight` (no gather needed);
    "mixed": row b blends slots `idx[b]` with weights `w[b]` (weight 0 pads unused entries).
    """

    mode: str = "off"
    slot: int = 0
    weight: float = 1.0
    idx: torch.Tensor | None = None  # [B, k] long
    w: torch.Tensor | None = None  # [B, k] compute dtype


@dataclass
class RoutingContext:
    """The per-forward routing shared by every stacked layer of one engine."""

    lora: KindRouting = field(default_factory=KindRouting)
    bottleneck: KindRouting = field(default_factory=KindRouting)

    def reset(self) -> None:
        self.lora = KindRouting()
        self.bottleneck = KindRouting()


def _grow(stack: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `stack` along `dim` up to `size` (no-op if already that large)."""
    if stack.shape[dim] >= size:
        return stack
    pad_shape = list(stack.shape)
    pad_shape[dim] = size - stack.shape[dim]
    return torch.cat([stack, stack.new_zeros(pad_shape)], dim=dim)


class StackedLoraLinear(nn.Module):
    """A linear layer plus a stack of LoRA adapters applied per row (see module docstring)."""

    def __init__(self, base_layer: nn.Module, ctx: RoutingContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # Buffers, not parameters: adapters are inference-only here and must not show up as
        # trainable weights of the base.
        self.register_buffer("lora_A", torch.zeros(0, 0, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_Bt", torch.zeros(0, 0, self.out_features, dtype=dtype, device=device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `proj.weight` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def n_slots(self) -> int:
        return self.lora_A.shape[0]

    def append_slot(self, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Add one slot at the end: A [r, in] and B [out, r], or None for "not targeted" (zeros)."""
        r = 0 if a is None else a.shape[0]
        r_max = max(self.lora_A.shape[1], r)
        A = _grow(self.lora_A, 1, r_max)
        Bt = _grow(self.lora_Bt, 1, r_max)
        new_a = A.new_zeros(1, r_max, self.in_features)
        new_bt = Bt.new_zeros(1, r_max, self.out_features)
        if a is not None and b is not None:
            new_a[0, :r] = a.to(A.dtype)
            # Fold the scaling into B once here so the hot path has one multiply less.
            new_bt[0, :r] = (b.to(torch.float32) * scale).t().to(Bt.dtype)
        self.lora_A = torch.cat([A, new_a])
        self.lora_Bt = torch.cat([Bt, new_bt])

    def keep_slots(self, keep: list[int]) -> None:
        """Keep only the slots `keep` (in that order) and trim the rank padding."""
        index = torch.tensor(keep, dtype=torch.long, device=self.lora_A.device)
        A = self.lora_A.index_select(0, index)
        Bt = self.lora_Bt.index_select(0, index)
        used = (A.abs().sum(dim=(0, 2)) + Bt.abs().sum(dim=(0, 2))) > 0
        r_max = int(used.nonzero().max().item()) + 1 if used.any() else 0
        self.lora_A = A[:, :r_max].contiguous()
        self.lora_Bt = Bt[:, :r_max].contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        rt = self.ctx.lora
        if rt.mode == "off" or self.lora_A.shape[1] == 0:
            return result
        xa = x.to(self.lora_A.dtype)
        if rt.mode == "single":
            delta = (xa @ self.lora_A[rt.slot].t()) @ self.lora_Bt[rt.slot]
            if rt.weight != 1.0:
                delta = delta * rt.weight
        else:
            idx, w = rt.idx, rt.w
            n, k = idx.shape
            r = self.lora_A.shape[1]
            x3 = xa.reshape(n, -1, self.in_features)
            # Gather each row's k adapters and fold them into one [k*r] inner dimension, so a
            # top-k blend is still two bmm calls.
            a = self.lora_A[idx].reshape(n, k * r, self.in_features)
            h = torch.bmm(x3, a.transpose(1, 2))
            h = (h.view(n, -1, k, r) * w.view(n, 1, k, 1)).view(n, -1, k * r)
            delta = torch.bmm(h, self.lora_Bt[idx].reshape(n, k * r, self.out_features))
            delta = delta.view(*result.shape[:-1], self.out_features)
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"slots={self.lora_A.shape[0]}, r_max={self.lora_A.shape[1]}"


class StackedBottleneck(nn.Module):
    """A stack of bottleneck adapters applied, per row, to the output of one sublayer module.

    Attached with `attach(module)` as a forward hook; `detach()` removes it.
    """

    def __init__(self, hidden_size: int, ctx: RoutingContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.hidden_size = hidden_size
        self.ctx = ctx
        z = dict(dtype=dtype, device=device)
        self.register_buffer("down", torch.zeros(0, 0, hidden_size, **z), persistent=False)
        self.register_buffer("down_b", torch.zeros(0, 0, **z), persistent=False)
        self.register_buffer("up_t", torch.zeros(0, 0, hidden_size, **z), persistent=False)
        self.register_buffer("up_b", torch.zeros(0, hidden_size, **z), persistent=False)
        self.acts: list[str] = []  # activation name per slot
        self._handle = None

    @property
    def n_slots(self) -> int:
        return self.down.shape[0]

    def attach(self, module: nn.Module) -> None:
        self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def append_slot(self, weights: dict[str, torch.Tensor] | None, act: str, scale: float) -> None:
        """Add one slot: weights {down.weight [b,H], down.bias [b], up.weight [H,b], up.bias [H]}
        or None for "this adapter has no module here" (zeros)."""
        b = 0 if weights is None else weights["down.weight"].shape[0]
        b_max = max(self.down.shape[1], b)
        down, up_t = _grow(self.down, 1, b_max), _grow(self.up_t, 1, b_max)
        down_b = _grow(self.down_b, 1, b_max)
        nd, nub = down.new_zeros(1, b_max, self.hidden_size), down.new_zeros(1, self.hidden_size)
        ndb, nut = down.new_zeros(1, b_max), down.new_zeros(1, b_max, self.hidden_size)
        if weights is not None:
            f32 = {k: v.to(torch.float32) for k, v in weights.items()}
            nd[0, :b] = f32["down.weight"].to(down.dtype)
            ndb[0, :b] = f32["down.bias"].to(down.dtype)
            nut[0, :b] = (f32["up.weight"] * scale).t().to(down.dtype)
            nub[0] = (f32["up.bias"] * scale).to(down.dtype)
        self.down, self.down_b = torch.cat([down, nd]), torch.cat([down_b, ndb])
        self.up_t, self.up_b = torch.cat([up_t, nut]), torch.cat([self.up_b, nub])
        self.acts.append(act)

    def keep_slots(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.down.device)
        self.down = self.down.index_select(0, index)
        self.down_b = self.down_b.index_select(0, index)
        self.up_t = self.up_t.index_select(0, index)
        self.up_b = self.up_b.index_select(0, index)
        self.acts = [self.acts[i] for i in keep]

    def _activate(self, h: torch.Tensor, slots: torch.Tensor | int) -> torch.Tensor:
        """Apply each slot's activation; h is [..., k, b] and `slots` the slots of the k axis."""
        names = set(self.acts)
        if len(names) == 1 or isinstance(slots, int):
            name = self.acts[slots] if isinstance(slots, int) else names.pop()
            return ACTIVATIONS[name](h)
        # Adapters with different activations in one stack: pick per (row, entry). Every
        # activation maps 0 to 0, so zero-padded bottleneck units stay zero.
        act_ids = torch.tensor([sorted(names).index(a) for a in self.acts], device=h.device)[slots]  # [B, k]
        out = torch.zeros_like(h)
        for i, name in enumerate(sorted(names)):
            mask = (act_ids == i).view(act_ids.shape[0], 1, act_ids.shape[1], 1)
            out = torch.where(mask, ACTIVATIONS[name](h), out)
        return out

    def _hook(self, module: nn.Module, args, output):
        rt = self.ctx.bottleneck
        if rt.mode == "off" or self.down.shape[0] == 0:
            return None
        o = output[0] if isinstance(output, tuple) else output
        oa = o.to(self.down.dtype)
        if rt.mode == "single":
            s = rt.slot
            h = self._activate(oa @ self.down[s].t() + self.down_b[s], s)
            delta = h @ self.up_t[s] + self.up_b[s]
            if rt.weight != 1.0:
                delta = delta * rt.weight
        else:
            idx, w = rt.idx, rt.w
            n, k = idx.shape
            b = self.down.shape[1]
            o3 = oa.reshape(n, -1, self.hidden_size)
            h = torch.bmm(o3, self.down[idx].reshape(n, k * b, self.hidden_size).transpose(1, 2))
            h = h.view(n, -1, k, b) + self.down_b[idx].view(n, 1, k, b)
            h = self._activate(h, idx) * w.view(n, 1, k, 1)
            delta = torch.bmm(h.reshape(n, -1, k * b), self.up_t[idx].reshape(n, k * b, self.hidden_size))
            delta = delta + torch.bmm(w.view(n, 1, k), self.up_b[idx])  # sum_j w_j * up_bias_j
            delta = delta.view(o.shape)
        new = o + delta.to(o.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def extra_repr(self) -> str:
        return f"slots={self.down.shape[0]}, b_max={self.down.shape[1]}"
