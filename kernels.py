"""Fused Triton kernels for OFQL's one-step actor, with the plain-torch path chosen in one place.

What is fused (each is ONE kernel launch per call, every weight read once per program):

- `folded_policy` (inference): a = clip(e - u(e, 0, 1; s), -1, 1) with r = 0, t = 1 folded into the
  first layer's bias (`MeanFlowActor.folded()`): 4 Linear layers, 3 Mish, the subtraction and the clip.
- `time_embedding`: sinusoidal embedding -> Linear -> Mish -> Linear of DQL's TimeEmbedding, and its
  backward (gradients for the times and the four weight tensors) in a second kernel.
- `fused_velocity`: the whole unfolded actor u(z, r, t; s) including both time embeddings, and with
  `v` given, du/dt = v . d_z u + d_t u in the same pass (dual numbers, tangents (v, 0, 1) for (z, r, t):
  tangent_out = tangent_in W^T through Linear, Mish'(pre) * tangent through Mish). OFQL uses it for the
  stop-gradient MeanFlow target and for no-grad actions (TD target, evaluation).

Supported: float32 only (tl.dot runs in "ieee" precision, not TF32, so results match torch's fp32 to
~1e-6 relative); contiguous tensors on the device of the weights; any batch (rows are processed in
blocks of 16, padded and masked); any observation/action/hidden/time-embedding sizes (padded to
the next power of two >= 16 and masked; D4RL: obs 11-59, act 3-9, hidden 256). The actor must be the
network of ofql.py: net = 4 Linear layers with Mish between them, time embeddings Linear -> Mish -> Linear.

Hidden activations of one block of rows go through a small global scratch buffer (a program cannot
slice its own registers); it stays in L1/L2 on a GPU. Backward: `time_embedding` is an
autograd.Function whose backward kernel saves nothing but the times and recomputes the forward; its
weight gradients are summed per program, then over programs by torch (deterministic, no atomics).
`fused_velocity` has no backward: it feeds a stop-gradient target and no-grad actions, while the primal
u that carries gradients stays in torch (see docs/kernels.md).

Backends: `resolve_backend("auto" | "triton" | "torch")` is the one place that decides. "auto" is
Triton when CUDA and Triton are usable, else torch. On a CPU, Triton kernels run only under its
interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how the tests check them.

`compile_for_gpu()` builds every kernel for an NVIDIA GPU without one (Triton's bundled ptxas).
`python benchmarks/kernels_speed.py` times torch eager (ofql.py's references) vs torch.compile vs Triton on
the device it runs on. This file imports no project file (ofql.py imports it): the launchers take ofql.py's
modules as arguments.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # read by triton.jit below
BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# The one dispatcher
# ---------------------------------------------------------------------------------------------
def triton_unusable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernels cannot run on `device` (None: the default CUDA device), or None."""
    device = torch.device(device) if device is not None else None
    if INTERPRETED:
        return None if device is None or device.type == "cpu" else (
            "TRITON_INTERPRET=1 runs kernels on CPU tensors only; unset it to run them on the GPU")
    if not torch.cuda.is_available():
        return "Triton kernels need a CUDA GPU and torch.cuda.is_available() is False (or set TRITON_INTERPRET=1 " \
               "before importing kernels to run them slowly on the CPU, for tests)"
    if device is not None and device.type != "cuda":
        return f"Triton kernels run on CUDA tensors, not {device.type}"
    return None


def resolve_backend(requested: str = "auto", device: torch.device | str | None = None) -> str:
    """"auto" -> "triton" when CUDA and Triton are usable (never the slow CPU interpreter), else "torch";
    "triton" -> "triton" or a ValueError saying why not; "torch" -> "torch"."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels backend {requested!r} is not one of {BACKENDS}")
    if requested == "torch" or (requested == "auto" and (INTERPRETED or not torch.cuda.is_available())):
        return "torch"
    reason = triton_unusable_reason(device)
    if reason is None:
        return "triton"
    if requested == "auto":
        return "torch"
    raise ValueError(f"--kernels triton is not usable here: {reason}. Use --kernels auto or torch.")


# ---------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mish_and_slope(x):
    """mish(x) and mish'(x) from one sigmoid, as ofql.sigmoid_and_tanh_softplus / mish_derivative."""
    s = tl.sigmoid(x)
    n = s * (2 - s)
    tanh_sp = n / (2 - n)
    return x * tanh_sp, tanh_sp + x * s * (1 - tanh_sp * tanh_sp)


@triton.jit
def _matmul_wt(x, w_ptr, row_stride, col0, n0, K, N, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [rows, K_PAD] @ W[n0 : n0 + BLOCK_N, col0 : col0 + K]^T for a row-major W (nn.Linear layout).
    Columns of W past K and rows past N read as 0, so padding adds nothing."""
    k = tl.arange(0, K_PAD)[:, None]
    n = n0 + tl.arange(0, BLOCK_N)[None, :]
    w_t = tl.load(w_ptr + n * row_stride + col0 + k, mask=(k < K) & (n < N), other=0.0)
    return tl.dot(x, w_t, input_precision="ieee")


@triton.jit
def _vector(ptr, n0, N, BLOCK_N: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(ptr + n, mask=n < N, other=0.0)


@triton.jit
def _rows(ptr, row0, n_rows, n_cols, COLS_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    """A [BLOCK_B, COLS_PAD] tile of a contiguous [n_rows, n_cols] matrix, zero-padded."""
    rows = row0 + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.arange(0, COLS_PAD)[None, :]
    return tl.load(ptr + rows * n_cols + cols, mask=(rows < n_rows) & (cols < n_cols), other=0.0)


@triton.jit
def _store_rows(ptr, x, row0, n_rows, n_cols, COLS_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.arange(0, COLS_PAD)[None, :]
    tl.store(ptr + rows * n_cols + cols, x, mask=(rows < n_rows) & (cols < n_cols))


@triton.jit
def _hidden_layer(x_ptr, tx_ptr, w_ptr, b_ptr, y_ptr, ty_ptr, H, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_N: tl.constexpr, WITH_TANGENT: tl.constexpr):
    """y = mish(x W^T + b) (and ty = mish'(pre) * (tx W^T)) for one block of rows, scratch to scratch."""
    tile = tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, H_PAD)[None, :]
    x = tl.load(x_ptr + tile)
    if WITH_TANGENT:
        tx = tl.load(tx_ptr + tile)
    for n0 in range(0, H_PAD, BLOCK_N):
        pre = _matmul_wt(x, w_ptr, H, 0, n0, H, H, H_PAD, BLOCK_N) + _vector(b_ptr, n0, H, BLOCK_N)[None, :]
        y, slope = _mish_and_slope(pre)
        chunk = tl.arange(0, BLOCK_B)[:, None] * H_PAD + n0 + tl.arange(0, BLOCK_N)[None, :]
        tl.store(y_ptr + chunk, y)
        if WITH_TANGENT:
            tl.store(ty_ptr + chunk, slope * _matmul_wt(tx, w_ptr, H, 0, n0, H, H, H_PAD, BLOCK_N))
    tl.debug_barrier()  # the next layer reads columns other threads of this program wrote


@triton.jit
def _time_embedding(time, freqs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, DIM, DIM_PAD: tl.constexpr,
                    HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, WITH_TANGENT: tl.constexpr):
    """[sin(t f), cos(t f)] -> Linear(DIM, 2 DIM) -> Mish -> Linear(2 DIM, DIM) for a block of times,
    and with WITH_TANGENT its derivative in t (d sin = cos f, d cos = -sin f). Returns (emb, d emb)."""
    half = DIM // 2
    k = tl.arange(0, HALF_PAD)
    arg = time[:, None] * tl.load(freqs_ptr + k, mask=k < half, other=0.0)[None, :]
    sin, cos = tl.sin(arg), tl.cos(arg)
    pre = (_matmul_wt(sin, w1_ptr, DIM, 0, 0, half, 2 * DIM, HALF_PAD, HID_PAD)
           + _matmul_wt(cos, w1_ptr, DIM, half, 0, half, 2 * DIM, HALF_PAD, HID_PAD)
           + _vector(b1_ptr, 0, 2 * DIM, HID_PAD)[None, :])
    hidden, slope = _mish_and_slope(pre)
    emb = _matmul_wt(hidden, w2_ptr, 2 * DIM, 0, 0, 2 * DIM, DIM, HID_PAD, DIM_PAD) + _vector(b2_ptr, 0, DIM, DIM_PAD)[None, :]
    if WITH_TANGENT:
        freqs = tl.load(freqs_ptr + k, mask=k < half, other=0.0)[None, :]
        d_pre = (_matmul_wt(cos * freqs, w1_ptr, DIM, 0, 0, half, 2 * DIM, HALF_PAD, HID_PAD)
                 - _matmul_wt(sin * freqs, w1_ptr, DIM, half, 0, half, 2 * DIM, HALF_PAD, HID_PAD))
        d_emb = _matmul_wt(slope * d_pre, w2_ptr, 2 * DIM, 0, 0, 2 * DIM, DIM, HID_PAD, DIM_PAD)
    else:
        d_emb = emb
    return emb, d_emb


# Rows per program: tl.dot's minimum. Larger blocks read the weights fewer times but need more shared memory
# (sm_90 build of the JVP kernel: 96 KB at 16 rows, 128 KB at 32) and give a small batch fewer programs.
BLOCK_ROWS = 16
LAUNCH = {"num_warps": 4, "num_stages": 1}  # no software pipelining of the chunk loops: it triples shared memory


def _pad(n: int) -> int:
    """tl.dot needs every block dimension >= 16 and tl.arange a power of two."""
    return max(16, triton.next_power_of_2(n))


def _check(name: str, x: torch.Tensor, shape: tuple, device: torch.device):
    """Launcher input checks with errors that name the problem and the fix."""
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: the Triton kernels take float32, got {x.dtype}; convert with .float()")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the weights are on {device}; move it with .to()")
    if not x.is_contiguous():
        raise ValueError(f"{name} is not contiguous; pass {name}.contiguous()")


def _check_params(params: list[torch.Tensor]) -> torch.device:
    """The weights: float32, contiguous, on one device where the kernels can run; returns that device."""
    device = params[0].device
    reason = triton_unusable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    for i, p in enumerate(params):
        _check(f"parameter {i}", p, p.shape, device)
    return device


def _linear_mish_stack(net: torch.nn.Sequential, n_linear: int) -> list[torch.nn.Linear]:
    """The Linear layers of an ofql.mlp (Linear, Mish, ..., Linear), checked."""
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    if len(linears) != n_linear or len(net) != 2 * n_linear - 1:
        raise ValueError(f"the fused kernels expect ofql's MLP of {n_linear} Linear layers with Mish between them, "
                         f"got {net}")
    return linears


# ---------------------------------------------------------------------------------------------
# 1. Fused inference actor (folded r = 0, t = 1)
# ---------------------------------------------------------------------------------------------
# torch reference: ofql.FoldedActor.forward, a = clip(e - mlp([e, s]), -1, 1)
@triton.jit
def _folded_actor_kernel(noise_ptr, obs_ptr, w0, b0, w1, b1, w2, b2, w3, b3, action_ptr, scratch_ptr,
                         B, A, S, H, A_PAD: tl.constexpr, S_PAD: tl.constexpr, H_PAD: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_B
    noise = _rows(noise_ptr, row0, B, A, A_PAD, BLOCK_B)
    obs = _rows(obs_ptr, row0, B, S, S_PAD, BLOCK_B)
    # this program's three [BLOCK_B, H_PAD] scratch tiles (hidden activations of layers 0, 1, 2)
    h0 = scratch_ptr + tl.program_id(0) * 3 * BLOCK_B * H_PAD
    h1, h2 = h0 + BLOCK_B * H_PAD, h0 + 2 * BLOCK_B * H_PAD
    for n0 in range(0, H_PAD, BLOCK_N):  # first layer over [e, s]: two dots, no concatenation
        pre = (_matmul_wt(noise, w0, A + S, 0, n0, A, H, A_PAD, BLOCK_N)
               + _matmul_wt(obs, w0, A + S, A, n0, S, H, S_PAD, BLOCK_N) + _vector(b0, n0, H, BLOCK_N)[None, :])
        y, _ = _mish_and_slope(pre)
        tl.store(h0 + tl.arange(0, BLOCK_B)[:, None] * H_PAD + n0 + tl.arange(0, BLOCK_N)[None, :], y)
    tl.debug_barrier()
    _hidden_layer(h0, h0, w1, b1, h1, h1, H, H_PAD, BLOCK_B, BLOCK_N, False)
    _hidden_layer(h1, h1, w2, b2, h2, h2, H, H_PAD, BLOCK_B, BLOCK_N, False)
    hidden = tl.load(h2 + tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, H_PAD)[None, :])
    u = _matmul_wt(hidden, w3, H, 0, 0, H, A, H_PAD, A_PAD) + _vector(b3, 0, A, A_PAD)[None, :]
    action = tl.minimum(tl.maximum(noise - u, -1.0), 1.0)
    _store_rows(action_ptr, action, row0, B, A, A_PAD, BLOCK_B)


def _folded_params(folded) -> tuple[list[torch.Tensor], int, int, int]:
    """The weights of an ofql.FoldedActor (views of its parameters, checked) and its sizes (A, S, H)."""
    linears = _linear_mish_stack(folded.net, 4)
    params = [p.detach() for layer in linears for p in (layer.weight, layer.bias)]
    _check_params(params)
    return params, folded.act_dim, linears[0].in_features - folded.act_dim, linears[0].out_features


def _launch_folded(params: list[torch.Tensor], A: int, S: int, H: int, obs: torch.Tensor, noise: torch.Tensor,
                   out: torch.Tensor | None) -> torch.Tensor:
    device, B = params[0].device, obs.shape[0] if obs.dim() == 2 else -1
    _check("obs", obs, (B, S), device)
    _check("noise", noise, (B, A), device)
    out = torch.empty(B, A, device=device) if out is None else out
    _check("out", out, (B, A), device)
    h_pad = _pad(H)
    grid = (triton.cdiv(B, BLOCK_ROWS),)
    scratch = torch.empty(grid[0] * 3 * BLOCK_ROWS * h_pad, device=device)
    _folded_actor_kernel[grid](noise, obs, *params, out, scratch, B, A, S, H, A_PAD=_pad(A), S_PAD=_pad(S),
                               H_PAD=h_pad, BLOCK_B=BLOCK_ROWS, BLOCK_N=min(64, h_pad), **LAUNCH)
    return out


def folded_actor_triton(folded, obs: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher of the fused inference actor: `folded` is an ofql.FoldedActor; returns actions [B, A]."""
    return _launch_folded(*_folded_params(folded), obs, noise, out)


def folded_policy(folded, backend: str = "auto") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """policy(obs [B, S] float32, noise [B, A] float32) -> actions [B, A] in [-1, 1], no autograd graph,
    on the device of `folded` (an ofql.FoldedActor). The backend is resolved and the weights are checked
    once, here (per call only obs and noise are: Python checks cost ~2 us each); the policy reads the
    current values of `folded`'s parameters at every call (in-place updates show, replaced tensors do not)."""
    device = next(folded.parameters()).device
    if resolve_backend(backend, device) == "triton":
        params = _folded_params(folded)
        return lambda obs, noise: _launch_folded(*params, obs, noise, None)
    return torch.no_grad()(folded.forward)


# ---------------------------------------------------------------------------------------------
# 2. Fused time embedding
# ---------------------------------------------------------------------------------------------
# torch reference: ofql.TimeEmbedding.forward
@triton.jit
def _time_embedding_kernel(time_ptr, freqs, w1, b1, w2, b2, out_ptr, B, DIM, DIM_PAD: tl.constexpr,
                           HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    time = tl.load(time_ptr + rows, mask=rows < B, other=0.0)
    emb, _ = _time_embedding(time, freqs, w1, b1, w2, b2, DIM, DIM_PAD, HALF_PAD, HID_PAD, False)
    _store_rows(out_ptr, emb, tl.program_id(0) * BLOCK_B, B, DIM, DIM_PAD, BLOCK_B)


def _time_embedding_params(emb) -> tuple[int, list[torch.Tensor]]:
    first, second = _linear_mish_stack(emb.mlp, 2)
    dim = emb.freqs.numel() * 2
    if (first.in_features, first.out_features, second.out_features) != (dim, 2 * dim, dim):
        raise ValueError(f"expected ofql.TimeEmbedding's Linear({dim}, {2 * dim}) -> Mish -> Linear({2 * dim}, {dim})")
    return dim, [emb.freqs, first.weight.detach(), first.bias.detach(), second.weight.detach(), second.bias.detach()]


def time_embedding_triton(emb, time: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher: emb(time) for an ofql.TimeEmbedding `emb` and times [B]; returns [B, dim]. No autograd."""
    dim, params = _time_embedding_params(emb)
    device = _check_params(params)
    B = time.shape[0] if time.dim() == 1 else -1
    _check("time", time, (B,), device)
    out = torch.empty(B, dim, device=device) if out is None else out
    _check("out", out, (B, dim), device)
    _time_embedding_kernel[(triton.cdiv(B, BLOCK_ROWS),)](time, *params, out, B, dim, DIM_PAD=_pad(dim),
                                                          HALF_PAD=_pad(dim // 2), HID_PAD=_pad(2 * dim),
                                                          BLOCK_B=BLOCK_ROWS, **LAUNCH)
    return out


@triton.jit
def _time_embedding_backward_kernel(time_ptr, grad_ptr, freqs, w1, b1, w2, b2, grad_time_ptr, partial_ptr, B, DIM,
                                    DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr,
                                    BLOCK_B: tl.constexpr):
    """Gradients for one block of rows: d time per row, and this block's sums of the weight gradients
    (one row of `partial` per program, [dW1, db1, dW2, db2] flattened; the launcher sums the programs)."""
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    half, hid = DIM // 2, 2 * DIM
    time = tl.load(time_ptr + rows, mask=rows < B, other=0.0)
    grad = _rows(grad_ptr, row0, B, DIM, DIM_PAD, BLOCK_B)  # padded rows are 0, so they add nothing below
    # recompute the forward
    k = tl.arange(0, HALF_PAD)
    f = tl.load(freqs + k, mask=k < half, other=0.0)[None, :]
    arg = time[:, None] * f
    sin, cos = tl.sin(arg), tl.cos(arg)
    pre = (_matmul_wt(sin, w1, DIM, 0, 0, half, hid, HALF_PAD, HID_PAD)
           + _matmul_wt(cos, w1, DIM, half, 0, half, hid, HALF_PAD, HID_PAD) + _vector(b1, 0, hid, HID_PAD)[None, :])
    hidden, slope = _mish_and_slope(pre)
    # backward: d hidden = grad W2, d pre = mish'(pre) d hidden, d [sin, cos] = d pre W1
    i, j = tl.arange(0, DIM_PAD)[:, None], tl.arange(0, HID_PAD)[None, :]
    w2_tile = tl.load(w2 + i * hid + j, mask=(i < DIM) & (j < hid), other=0.0)
    d_pre = slope * tl.dot(grad, w2_tile, input_precision="ieee")
    j, k = tl.arange(0, HID_PAD)[:, None], tl.arange(0, HALF_PAD)[None, :]
    in_w1 = (j < hid) & (k < half)
    d_sin = tl.dot(d_pre, tl.load(w1 + j * DIM + k, mask=in_w1, other=0.0), input_precision="ieee")
    d_cos = tl.dot(d_pre, tl.load(w1 + j * DIM + half + k, mask=in_w1, other=0.0), input_precision="ieee")
    tl.store(grad_time_ptr + rows, tl.sum((d_sin * cos - d_cos * sin) * f, 1), mask=rows < B)
    # this block's weight gradients
    out = partial_ptr + tl.program_id(0) * (2 * hid * DIM + hid + DIM)
    tl.store(out + j * DIM + k, tl.dot(tl.trans(d_pre), sin, input_precision="ieee"), mask=in_w1)
    tl.store(out + j * DIM + half + k, tl.dot(tl.trans(d_pre), cos, input_precision="ieee"), mask=in_w1)
    n = tl.arange(0, HID_PAD)
    tl.store(out + hid * DIM + n, tl.sum(d_pre, 0), mask=n < hid)
    i, j = tl.arange(0, DIM_PAD)[:, None], tl.arange(0, HID_PAD)[None, :]
    tl.store(out + hid * DIM + hid + i * hid + j, tl.dot(tl.trans(grad), hidden, input_precision="ieee"),
             mask=(i < DIM) & (j < hid))
    n = tl.arange(0, DIM_PAD)
    tl.store(out + 2 * hid * DIM + hid + n, tl.sum(grad, 0), mask=n < DIM)


def time_embedding_backward_triton(emb, time: torch.Tensor, grad: torch.Tensor):
    """Launcher: (d time [B], [dW1, db1, dW2, db2]) of sum(grad * emb(time)) for an ofql.TimeEmbedding."""
    dim, params = _time_embedding_params(emb)
    device = _check_params(params)
    B = time.shape[0] if time.dim() == 1 else -1
    _check("time", time, (B,), device)
    _check("grad", grad, (B, dim), device)
    grid = (triton.cdiv(B, BLOCK_ROWS),)
    grad_time = torch.empty(B, device=device)
    partial = torch.empty(grid[0], 4 * dim * dim + 3 * dim, device=device)
    _time_embedding_backward_kernel[grid](time, grad, *params, grad_time, partial, B, dim, DIM_PAD=_pad(dim),
                                          HALF_PAD=_pad(dim // 2), HID_PAD=_pad(2 * dim), BLOCK_B=BLOCK_ROWS,
                                          **LAUNCH)
    sizes = [p.numel() for p in params[1:]]
    return grad_time, [g.view_as(p) for g, p in zip(partial.sum(0).split(sizes), params[1:])]


class TimeEmbeddingFunction(torch.autograd.Function):
    """Triton forward and backward; only the times are saved, the backward kernel recomputes the
    forward (two tiny layers) instead of keeping activations between the passes."""

    @staticmethod
    def forward(ctx, time, emb, *weights):
        ctx.emb = emb
        ctx.save_for_backward(time)
        return time_embedding_triton(emb, time)

    @staticmethod
    def backward(ctx, grad):
        (time,) = ctx.saved_tensors
        grad_time, grad_weights = time_embedding_backward_triton(ctx.emb, time, grad.contiguous())
        return grad_time, None, *grad_weights


def time_embedding(emb, time: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """emb(time) with gradients for `emb`'s weights and `time`: the fused kernel or the torch reference."""
    if resolve_backend(backend, time.device) == "triton":
        return TimeEmbeddingFunction.apply(time, emb, *emb.parameters())
    return emb(time)


# ---------------------------------------------------------------------------------------------
# 3. Fused velocity and JVP: u(z, r, t; s) and du/dt for tangents (v, 0, 1)
# ---------------------------------------------------------------------------------------------
# torch reference: ofql.MeanFlowActor.velocity_and_dudt (and torch.func.jvp of MeanFlowActor.forward)
@triton.jit
def _velocity_kernel(z_ptr, r_ptr, t_ptr, obs_ptr, v_ptr, freqs_r, wr1, br1, wr2, br2, freqs_t, wt1, bt1, wt2, bt2,
                     w0, b0, w1, b1, w2, b2, w3, b3, u_ptr, dudt_ptr, scratch_ptr, B, A, S, H, DIM,
                     A_PAD: tl.constexpr, S_PAD: tl.constexpr, H_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                     HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     WITH_TANGENT: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    z = _rows(z_ptr, row0, B, A, A_PAD, BLOCK_B)
    obs = _rows(obs_ptr, row0, B, S, S_PAD, BLOCK_B)
    r = tl.load(r_ptr + rows, mask=rows < B, other=0.0)
    t = tl.load(t_ptr + rows, mask=rows < B, other=0.0)
    emb_r, _ = _time_embedding(r, freqs_r, wr1, br1, wr2, br2, DIM, DIM_PAD, HALF_PAD, HID_PAD, False)
    emb_t, d_emb_t = _time_embedding(t, freqs_t, wt1, bt1, wt2, bt2, DIM, DIM_PAD, HALF_PAD, HID_PAD, WITH_TANGENT)
    if WITH_TANGENT:
        v = _rows(v_ptr, row0, B, A, A_PAD, BLOCK_B)
    # scratch: primal tiles h0, h1, h2, then (with the tangent) their tangent tiles
    tile = BLOCK_B * H_PAD
    h0 = scratch_ptr + tl.program_id(0) * (6 if WITH_TANGENT else 3) * tile
    h1, h2, th0, th1, th2 = h0 + tile, h0 + 2 * tile, h0 + 3 * tile, h0 + 4 * tile, h0 + 5 * tile
    row_stride = A + 2 * DIM + S  # first layer input: [z, emb(r), emb(t), s]
    offsets = tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, BLOCK_N)[None, :]
    for n0 in range(0, H_PAD, BLOCK_N):
        pre = (_matmul_wt(z, w0, row_stride, 0, n0, A, H, A_PAD, BLOCK_N)
               + _matmul_wt(emb_r, w0, row_stride, A, n0, DIM, H, DIM_PAD, BLOCK_N)
               + _matmul_wt(emb_t, w0, row_stride, A + DIM, n0, DIM, H, DIM_PAD, BLOCK_N)
               + _matmul_wt(obs, w0, row_stride, A + 2 * DIM, n0, S, H, S_PAD, BLOCK_N)
               + _vector(b0, n0, H, BLOCK_N)[None, :])
        y, slope = _mish_and_slope(pre)
        tl.store(h0 + n0 + offsets, y)
        if WITH_TANGENT:  # tangent of the input: (v, 0, d emb(t)/dt, 0)
            d_pre = (_matmul_wt(v, w0, row_stride, 0, n0, A, H, A_PAD, BLOCK_N)
                     + _matmul_wt(d_emb_t, w0, row_stride, A + DIM, n0, DIM, H, DIM_PAD, BLOCK_N))
            tl.store(th0 + n0 + offsets, slope * d_pre)
    tl.debug_barrier()
    _hidden_layer(h0, th0, w1, b1, h1, th1, H, H_PAD, BLOCK_B, BLOCK_N, WITH_TANGENT)
    _hidden_layer(h1, th1, w2, b2, h2, th2, H, H_PAD, BLOCK_B, BLOCK_N, WITH_TANGENT)
    full = tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, H_PAD)[None, :]
    u = _matmul_wt(tl.load(h2 + full), w3, H, 0, 0, H, A, H_PAD, A_PAD) + _vector(b3, 0, A, A_PAD)[None, :]
    _store_rows(u_ptr, u, row0, B, A, A_PAD, BLOCK_B)
    if WITH_TANGENT:
        _store_rows(dudt_ptr, _matmul_wt(tl.load(th2 + full), w3, H, 0, 0, H, A, H_PAD, A_PAD), row0, B, A, A_PAD, BLOCK_B)


def fused_velocity(actor, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor,
                   v: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Launcher: (u, du/dt) of an ofql.MeanFlowActor, du/dt = v . d_z u + d_t u (tangents (v, 0, 1) for
    (z, r, t)); with v=None only u is computed and du/dt is None. No autograd graph (stop-gradient use)."""
    linears = _linear_mish_stack(actor.net, 4)
    (dim, emb_r), (dim_t, emb_t) = _time_embedding_params(actor.emb_r), _time_embedding_params(actor.emb_t)
    if dim_t != dim:
        raise ValueError(f"the time embeddings of r and t must have one size, got {dim} and {dim_t}")
    A, H = actor.act_dim, linears[0].out_features
    S, B = linears[0].in_features - A - 2 * dim, z.shape[0] if z.dim() == 2 else -1
    params = emb_r + emb_t + [p.detach() for layer in linears for p in (layer.weight, layer.bias)]
    device = _check_params(params)
    for name, x, shape in (("z", z, (B, A)), ("r", r, (B,)), ("t", t, (B,)), ("obs", obs, (B, S))) + \
            ((("v", v, (B, A)),) if v is not None else ()):
        _check(name, x, shape, device)
    u, dudt = out if out is not None else (torch.empty(B, A, device=device), torch.empty(B, A, device=device))
    _check("out u", u, (B, A), device)
    _check("out du/dt", dudt, (B, A), device)
    h_pad, with_tangent = _pad(H), v is not None
    grid = (triton.cdiv(B, BLOCK_ROWS),)
    scratch = torch.empty(grid[0] * (6 if with_tangent else 3) * BLOCK_ROWS * h_pad, device=device)
    _velocity_kernel[grid](z, r, t, obs, z if v is None else v, *params, u, dudt, scratch, B, A, S, H, dim,
                           A_PAD=_pad(A), S_PAD=_pad(S), H_PAD=h_pad, DIM_PAD=_pad(dim), HALF_PAD=_pad(dim // 2),
                           HID_PAD=_pad(2 * dim), BLOCK_B=BLOCK_ROWS, BLOCK_N=min(64, h_pad), WITH_TANGENT=with_tangent,
                           **LAUNCH)
    return u, (dudt if with_tangent else None)


# ---------------------------------------------------------------------------------------------
# GPU build check without a GPU
# ---------------------------------------------------------------------------------------------
def compile_for_gpu(capability: int = 90, obs_dim: int = 17, act_dim: int = 6, hidden: int = 256,
                    time_dim: int = 16) -> dict[str, int]:
    """Compile every kernel for an NVIDIA GPU of this compute capability (90 = H100) with Triton's bundled
    ptxas, no GPU needed; returns the shared memory each needs per program (bytes). Catches what the CPU
    interpreter accepts but the GPU compiler rejects. Needs TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pads = {"A_PAD": _pad(act_dim), "S_PAD": _pad(obs_dim), "H_PAD": _pad(hidden), "BLOCK_B": BLOCK_ROWS,
            "BLOCK_N": min(64, _pad(hidden)), "DIM_PAD": _pad(time_dim), "HALF_PAD": _pad(time_dim // 2),
            "HID_PAD": _pad(2 * time_dim)}
    builds = {"folded actor": (_folded_actor_kernel, {}), "time embedding": (_time_embedding_kernel, {}),
              "time embedding backward": (_time_embedding_backward_kernel, {}),
              "velocity": (_velocity_kernel, {"WITH_TANGENT": False}),
              "velocity + du/dt": (_velocity_kernel, {"WITH_TANGENT": True})}
    shared = {}
    for name, (kernel, flags) in builds.items():
        constants = {p.name: pads.get(p.name, flags.get(p.name)) for p in kernel.params if p.is_constexpr}
        # arguments named in capitals (B, A, S, H, DIM) are sizes, the others float32 pointers
        signature = {p.name: "constexpr" if p.is_constexpr else "i32" if p.name.isupper() else "*fp32"
                     for p in kernel.params}
        source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        shared[name] = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=LAUNCH).metadata.shared
    return shared
