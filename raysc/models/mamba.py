"""A Mamba (selective state space) layer in pure PyTorch, with a chunked scan.

Recurrence per channel d and state n: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
y_t = C_t . h_t + D u_t. A fully parallel scan stores [batch, length, d_inner, d_state] for
every step of the scan, gigabytes at ASCMamba's sizes. Here the sequence is cut into chunks
that hand their last state to the next; in training each chunk is recomputed in backward
(activation checkpointing), so memory grows with the chunk, not with the sequence. Inside a
chunk, two exact methods:
- ``parallel``: a Hillis-Steele scan, log2(chunk) vectorised steps that multiply only decays
  <= 1 (cannot overflow); few, large kernels, the better choice on a GPU;
- ``sequential``: a loop over the chunk's steps on precomputed decays; chunk x less work than
  ``parallel``'s chunk x log2(chunk), the better choice on a CPU.
``auto`` picks by device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _scan_chunk_parallel(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    decay = torch.exp(delta.unsqueeze(-1) * A)  # [b, l, d, n], each in (0, 1]
    x = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)  # [b, l, d, n]
    x = torch.cat([decay[:, :1] * h0.unsqueeze(1) + x[:, :1], x[:, 1:]], dim=1)
    step, length = 1, x.shape[1]
    while step < length:
        # Combine each element with the one `step` back: (a1, x1) then (a2, x2) = (a2 a1, a2 x1 + x2).
        x = torch.cat([x[:, :step], decay[:, step:] * x[:, :-step] + x[:, step:]], dim=1)
        decay = torch.cat([decay[:, :step], decay[:, step:] * decay[:, :-step]], dim=1)
        step *= 2
    return torch.einsum("bldn,bln->bld", x, C), x[:, -1]


def _scan_chunk_sequential(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    decay = torch.exp(delta.unsqueeze(-1) * A)  # [b, l, d, n]
    x = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    h, ys = h0, []
    # The steps as views made once (unbind): indexing ``decay[:, t]`` in the loop instead makes
    # its backward fill a zero tensor of the whole chunk per step (quadratic in the chunk; most
    # of a CPU training step of ASCMamba under torch.profiler).
    for decay_t, x_t, c_t in zip(decay.unbind(1), x.unbind(1), C.unbind(1), strict=True):
        h = decay_t * h + x_t
        ys.append((h * c_t.unsqueeze(1)).sum(-1))
    return torch.stack(ys, dim=1), h


_CHUNK_SCANS = {"parallel": _scan_chunk_parallel, "sequential": _scan_chunk_sequential}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    *,
    chunk: int = 32,
    method: str = "auto",
) -> torch.Tensor:
    """u, delta: [b, L, d]; A: [d, n]; B, C: [b, L, n]; D: [d] -> y [b, L, d]."""
    if method == "auto":
        method = "parallel" if u.is_cuda else "sequential"
    scan_chunk = _CHUNK_SCANS[method]
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    ys = []
    for s in range(0, u.shape[1], chunk):
        args = (u[:, s : s + chunk], delta[:, s : s + chunk], A, B[:, s : s + chunk], C[:, s : s + chunk], h)
        y, h = checkpoint(scan_chunk, *args, use_reentrant=False) if recompute else scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys, dim=1) + u * D


def selective_scan_reference(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """The recurrence one step at a time: the definition the chunked scan is tested against."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + u * D


class Mamba(nn.Module):
    """in_proj -> causal depthwise conv + SiLU -> selective scan -> gate y * SiLU(z) -> out_proj."""

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 4, chunk: int = 32) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_state, self.chunk = d_state, chunk
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # Mamba's initialisation: softplus(dt bias) spread log-uniformly over [1e-3, 1e-1].
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[b, L, d_model] -> [b, L, d_model]."""
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: drop the right pad
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        # The scan accumulates over hundreds of steps: keep it in fp32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), self.D.float(), chunk=self.chunk)
        return self.out_proj((y * F.silu(z.float())).to(x.dtype))


class BiMamba(nn.Module):
    """A forward and a backward Mamba, concatenated and projected back (as in SEMamba)."""

    def __init__(self, d_model: int, **kwargs) -> None:
        super().__init__()
        self.fwd = Mamba(d_model, **kwargs)
        self.bwd = Mamba(d_model, **kwargs)
        self.proj = nn.Linear(2 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([self.fwd(x), self.bwd(x.flip(1)).flip(1)], dim=-1))
