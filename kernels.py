"""Fused Triton kernels for OFQL's one-step actor, their plain-torch references, and the one backend switch.

What is fused (each is ONE kernel launch per call; every weight tile is loaded once per program):

- `act` / `folded_policy` (inference): a = clip(e - u(e, 0, 1; s), -1, 1). `act` reads the unfolded actor's
  weights and folds r = 0, t = 1 into the first layer's bias inside the kernel (two one-row time embeddings per
  program), so the TD target and evaluation need no host-side folding; `folded_policy` runs the same kernel on
  an eval.FoldedActor (deployment).
- `time_embedding`: sinusoidal embedding -> Linear -> Mish -> Linear of DQL's TimeEmbedding, and its backward
  (gradients for the times and the four weight tensors) in a second kernel.
- `velocity` / `velocity_and_dudt`: the whole unfolded actor u(z, r, t; s) with both time embeddings and, given
  v, du/dt = v . d_z u + d_t u in the same pass (dual numbers, tangents (v, 0, 1) for (z, r, t): tangent_out =
  tangent_in W^T through Linear, Mish'(pre) * tangent through Mish). For training, `velocity_and_dudt` is an
  autograd.Function: the kernel also saves each hidden activation and Mish slope, and the backward is plain
  torch matmuls over them (u is computed once, by the kernel; nothing is recomputed).

Layout (as Triton's tutorials): each kernel stands next to its plain-torch reference over raw weight tensors
(`*_reference`, the contract ofql.py's modules are tested against), then its launcher, then its
autograd.Function where it has a backward. This file imports torch and triton only.

Precision (`PRECISIONS`): every matrix product is `tl.dot` with fp32 accumulation, its inputs rounded as the
precision says: "ieee" (exact fp32, FFMA; tests), "tf32" (tensor cores, 10-bit mantissa: the default where
the GPU has them, sm_80+), "bf16" (tensor cores, operands rounded to bfloat16, weights stay fp32 in memory).
`TOLERANCE[precision]` is the documented bound on the relative error against the fp32 reference (see
docs/kernels.md); the references take the same `precision` and round their operands the same way, which is how
the bound is tested without a GPU. Row blocks below 16 (batch 1) have no tensor-core tile: they use fp32 FMA
whatever the precision (exact).

Shapes (`LAUNCH_TABLE`, `launch_config`): the row block, warps and stages come from a small explicit table per
batch bucket (reasons next to the table). Sizes are padded to powers of two (>= 16 for tl.dot operands) and
masked: D4RL obs 11-59, act 3-9, hidden 256, time embedding 16.

Hot path (`ActorWeights`, `FoldedWeights`): the weights are validated once per weight set (a small object that
holds the Parameter objects themselves, so in-place optimiser steps show and nothing is copied); per call the
launchers check only the call's inputs. ofql.MeanFlowActor caches its ActorWeights and drops it when .to()
moves its storage; a deepcopy (EMA target) builds its own.

Hidden activations of a block of rows go through global scratch tiles (Triton has no user-managed shared
memory; a tile is BLOCK_B x H_PAD fp32 per layer, i.e. BLOCK_B / H of the weight traffic, and stays in L1/L2);
in training the scratch is the saved activations of the backward.

Backends: `resolve_backend("auto" | "triton" | "torch")` is the one place that decides. "auto" is Triton when
CUDA and Triton are usable, else torch. On a CPU, Triton kernels run only under its interpreter
(TRITON_INTERPRET=1 set before this module is imported), which is how the tests check them; there the tf32 and
bf16 products are emulated by rounding the operands as the tensor cores do (the interpreter computes every
tl.dot in fp32 and mishandles bfloat16 operands).

`build_analysis()` compiles every kernel at every shipped configuration for an NVIDIA GPU without one (Triton's
bundled ptxas and cuobjdump) and reads registers, spills, local memory, shared memory, tensor-core instructions
and weight-tile loads from the compiled code. `python kernels.py` prints that table.
"""
from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # read by triton.jit below
_EMULATE = tl.constexpr(INTERPRETED)  # under the interpreter, tf32/bf16 products are emulated (see _mm)
BACKENDS = ("auto", "triton", "torch")
PRECISIONS = ("ieee", "tf32", "bf16")
# Max relative error (max |out - ref| / max |ref|) of a kernel's outputs (u, du/dt, actions, time embeddings)
# against the fp32 reference, per precision. Rule: 16 unit roundoffs of the operand format (tf32 as the tensor
# cores read it, low 13 bits dropped: 2^-10; bf16 rounded to nearest: 2^-8), floored at 1e-5 for fp32's
# summation-order differences (ieee). Measured over the tests' random actors (4 layers, K <= 300, du/dt
# included): at most ~4 unit roundoffs (docs/kernels.md), so 16 leaves a 4x margin, while a product computed at
# the wrong place or with a wrong operand is off by O(1).
UNIT_ROUNDOFF = {"ieee": 2.0 ** -24, "tf32": 2.0 ** -10, "bf16": 2.0 ** -8}
TOLERANCE = {p: max(1e-5, 16 * u) for p, u in UNIT_ROUNDOFF.items()}


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
    """"auto" -> "torch" everywhere: on the one GPU that has run them (an H200 with Triton 3.6, 2026-12-04,
    benchmarks/results/gpu/) the kernels failed three accuracy tests, so they run only on request until a GPU
    run passes them; "triton" -> "triton" or a ValueError saying why not; "torch" -> "torch"."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels backend {requested!r} is not one of {BACKENDS}")
    if requested != "triton":
        return "torch"
    reason = triton_unusable_reason(device)
    if reason is None:
        return "triton"
    raise ValueError(f"--kernels triton is not usable here: {reason}. Use --kernels auto or torch.")


def resolve_precision(requested: str = "auto", device: torch.device | str | None = None) -> str:
    """"auto" -> "tf32" on a CUDA GPU with tensor cores for it (sm_80+), else "ieee" (the interpreter included);
    "ieee" / "tf32" / "bf16" as asked (tf32 and bf16 need sm_80+ on a GPU)."""
    if requested != "auto" and requested not in PRECISIONS:
        raise ValueError(f"kernel precision {requested!r} is not one of {('auto',) + PRECISIONS}")
    device = torch.device(device) if device is not None else None
    on_gpu = not INTERPRETED and torch.cuda.is_available() and (device is None or device.type == "cuda")
    capable = on_gpu and torch.cuda.get_device_capability(device) >= (8, 0)
    if requested == "auto":
        return "tf32" if capable else "ieee"
    if requested != "ieee" and on_gpu and not capable:
        raise ValueError(f"kernel precision {requested} needs tensor cores for it (compute capability 8.0+); "
                         f"use ieee")
    return requested


# ---------------------------------------------------------------------------------------------
# Launch configurations: a small explicit table per batch bucket
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    block_b: int  # rows per program; < 16: fp32 FMA (no tensor-core tile that small), >= 16: tl.dot
    block_n: int  # output columns per step of a layer (accumulator [block_b, block_n])
    block_k: int  # input columns per step (weight tile [block_k, block_n], loaded once per program)
    num_warps: int
    num_stages: int  # software pipelining of the k loops (cp.async prefetch of the next weight tile)


# (smallest batch of the bucket, precisions, config): launch_config takes the last row that fits. Why these: a
# program must read every weight of the network (layers depend on each other), ~540 KB fp32 at hidden 256, so a
# call costs at least one weight read by one SM whatever its rows; more programs add L2 traffic, not speed, once
# that read dominates. So:
# - batch < 16: one row per program, fp32 FMA (any precision: the kernels are launched as ieee). A tensor-core
#   tile has 16 rows; batch 1 would pay for 15 padding rows (and their registers). Each row gets its own
#   program, so up to 15 rows run side by side in the time of one. 8 warps: more loads in flight for the one
#   weight read that bounds the time. 1 stage: Triton pipelines only loads that feed tl.dot (a 2-stage build of
#   this path has the same code, no async copies).
# - 16 <= batch (training batch 256, evaluation): 16-row tiles, tl.dot (tensor cores in tf32 / bf16: mma.sync
#   m16), 4 warps, 2 stages (the next weight tile is copied to shared memory while the current one is multiplied).
#   Batch 256 -> 16 programs, each reading the weights once (L2: 16 x 540 KB). ieee (exact FFMA, for tests) takes
#   [16, 64] k-steps instead of [32, 64]: with 32 the act build spills on sm_80 and sm_90 (build_analysis).
# - batch >= 2048 in tf32 / bf16 (max-Q backup, 10 x 256 next actions; large evaluations): 64-row tiles (sm_90:
#   wgmma), a quarter of the weight traffic per row; 2048 rows still make 32 programs. 8 warps: with 4, the u +
#   du/dt build needs 255 registers and spills. ieee stays at 16 rows there: its FFMA tiles of 64 rows spill.
# Values are predictions from the compiled code (build_analysis), not measurements: no GPU has run these kernels.
TENSOR_CORES = ("tf32", "bf16")
LAUNCH_TABLE: tuple[tuple[int, tuple[str, ...], LaunchConfig], ...] = (
    (1, PRECISIONS, LaunchConfig(block_b=1, block_n=64, block_k=32, num_warps=8, num_stages=1)),
    (16, TENSOR_CORES, LaunchConfig(block_b=16, block_n=64, block_k=32, num_warps=4, num_stages=2)),
    (16, ("ieee",), LaunchConfig(block_b=16, block_n=64, block_k=16, num_warps=4, num_stages=2)),
    (2048, TENSOR_CORES, LaunchConfig(block_b=64, block_n=64, block_k=32, num_warps=8, num_stages=2)),
)


def launch_config(batch: int, precision: str = "tf32") -> LaunchConfig:
    """The row block, tile sizes, warps and stages for a call on `batch` rows in `precision` (LAUNCH_TABLE)."""
    config = LAUNCH_TABLE[0][2]
    for smallest, precisions, candidate in LAUNCH_TABLE:
        if batch >= smallest and precision in precisions:
            config = candidate
    return config


def kernel_precision(config: LaunchConfig, precision: str) -> str:
    """The PRECISION a kernel is launched with: one-row blocks multiply in fp32 FMA whatever was asked, so they
    are launched (and built, once) as ieee."""
    return precision if config.block_b >= 16 else "ieee"


def time_embedding_config(batch: int) -> LaunchConfig:
    """The time-embedding kernels (forward and backward, tiny: K <= 32) take 16-row tiles, or one row below 16
    rows; 4 warps, nothing to pipeline."""
    return LaunchConfig(block_b=1 if batch < 16 else 16, block_n=16, block_k=16, num_warps=4, num_stages=1)


def _pad(n: int) -> int:
    """tl.dot needs every block dimension >= 16 and tl.arange a power of two."""
    return max(16, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# Shared pieces of the references and kernels
# ---------------------------------------------------------------------------------------------
def round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """x as a tensor core reads it: tf32 keeps 10 mantissa bits (the low 13 bits of an fp32 operand are ignored,
    i.e. truncated), bf16 rounds to nearest at 7 bits; ieee leaves it. Products of rounded operands are exact in
    fp32, so rounded operands + fp32 matmul model the tensor cores up to the order of the sums."""
    if precision == "tf32":
        return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)  # -8192 = 0xFFFFE000
    if precision == "bf16":
        return x.to(torch.bfloat16).float()
    return x


def linear_reference(x, weight, bias, precision: str = "ieee"):
    return F.linear(round_operand(x, precision), round_operand(weight, precision), bias)


def sigmoid_and_tanh_softplus(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(x) and tanh(softplus(x)) from one sigmoid: with s = sigmoid(x) and n = s (2 - s),
    tanh(softplus(x)) = n / (2 - n). Same fp32 result as aten::mish, ~3x faster on CPU."""
    s = torch.sigmoid(x)
    n = s * (2 - s)
    return s, n / (2 - n)


def mish_slope(x, s, tanh_sp):
    """d/dx [x tanh(softplus(x))] = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2), from s = sigmoid(x) and tanh(sp)."""
    return tanh_sp + x * s * (1 - tanh_sp * tanh_sp)


def mish_and_slope_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mish(x) and mish'(x) from one sigmoid."""
    s, tanh_sp = sigmoid_and_tanh_softplus(x)
    return x * tanh_sp, mish_slope(x, s, tanh_sp)


class Mish(torch.autograd.Function):
    """mish(x) = x tanh(softplus(x)) whose backward and forward mode (torch.func.jvp) reuse the sigmoid and
    tanh(softplus) of the forward pass: the torch path's Mish (ofql.py's, when this file is present)."""

    @staticmethod
    def forward(x):
        s, tanh_sp = sigmoid_and_tanh_softplus(x)
        return x * tanh_sp, s, tanh_sp

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, s, tanh_sp = output
        ctx.mark_non_differentiable(s, tanh_sp)
        ctx.save_for_backward(inputs[0], s, tanh_sp)
        ctx.save_for_forward(inputs[0], s, tanh_sp)

    @staticmethod
    def backward(ctx, grad, _grad_s, _grad_tanh_sp):
        return grad * mish_slope(*ctx.saved_tensors)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent * mish_slope(*ctx.saved_tensors), None, None


def mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mish(x) with its detached sigmoid(x) and tanh(softplus(x)). Under torch.compile plain ops, which inductor
    fuses with their backward (Dynamo cannot trace the custom jvp: one graph break per layer)."""
    if torch.compiler.is_compiling():
        s, tanh_sp = sigmoid_and_tanh_softplus(x)
        return x * tanh_sp, s.detach(), tanh_sp.detach()
    return Mish.apply(x)


def mish(x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad:
        return mish_parts(x)[0]
    if x.numel() < 4096:  # small inference batches: one aten call beats seven cheaper ones (2 vs 12 us at 256)
        return F.mish(x)
    return x * sigmoid_and_tanh_softplus(x)[1]  # inference: no autograd.Function overhead (~60 us a call)


def mish_and_slope(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mish(x) with its graph and mish'(x) without, from one sigmoid (ofql.mlp_with_tangent's Mish)."""
    y, s, tanh_sp = mish_parts(x)
    with torch.no_grad():
        return y, mish_slope(x.detach(), s, tanh_sp)


@triton.jit
def _mish_and_slope(x):
    """mish(x) and mish'(x) from one sigmoid, as mish_and_slope_reference."""
    s = tl.sigmoid(x)
    n = s * (2 - s)
    tanh_sp = n / (2 - n)
    return x * tanh_sp, tanh_sp + x * s * (1 - tanh_sp * tanh_sp)


@triton.jit
def _sin_cos(x):
    """sin(x) and cos(x) in plain arithmetic: x reduced to [-pi, pi] (2 pi split in two constants), then Taylor
    polynomials to degree 17 / 18 (truncation error < 3e-8, fp32 rounding ~1e-6 absolute). libdevice's sinf/cosf
    would put a 28-byte local-memory array (their huge-argument slow path) in every kernel that embeds a time."""
    k = tl.floor(x * 0.15915494309189535 + 0.5)
    y = (x - k * 6.28125) - k * 0.0019353071795864769  # 6.28125 + 0.00193530717958... = 2 pi
    y2 = y * y
    s = 2.8114572543455206e-15  # Horner in y^2: sin y = y (1 - y^2 / 3! + y^4 / 5! - ...)
    s = 7.647163731819816e-13 - y2 * s  # 1/15!
    s = 1.6059043836821613e-10 - y2 * s  # 1/13!
    s = 2.505210838544172e-08 - y2 * s  # 1/11!
    s = 2.7557319223985893e-06 - y2 * s  # 1/9!
    s = 0.0001984126984126984 - y2 * s  # 1/7!
    s = 0.008333333333333333 - y2 * s  # 1/5!
    s = 0.16666666666666666 - y2 * s  # 1/3!
    s = 1.0 - y2 * s  # 1/1!
    c = 1.5619206968586225e-16  # cos y = 1 - y^2 / 2! + y^4 / 4! - ...
    c = 4.779477332387385e-14 - y2 * c  # 1/16!
    c = 1.1470745597729725e-11 - y2 * c  # 1/14!
    c = 2.08767569878681e-09 - y2 * c  # 1/12!
    c = 2.755731922398589e-07 - y2 * c  # 1/10!
    c = 2.48015873015873e-05 - y2 * c  # 1/8!
    c = 0.001388888888888889 - y2 * c  # 1/6!
    c = 0.041666666666666664 - y2 * c  # 1/4!
    c = 0.5 - y2 * c  # 1/2!
    c = 1.0 - y2 * c  # 1/0!
    return y * s, c


@triton.jit
def _tf32_truncate(x):
    """x as a tf32 operand of the tensor cores: the low 13 mantissa bits dropped (interpreter emulation)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_round(x):
    """x rounded to bfloat16 (nearest, ties to even), kept in fp32 (interpreter emulation of cvt.rn.bf16)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(x, w_t, PRECISION: tl.constexpr):
    """x [M, K] @ w_t [K, N] with fp32 accumulation. Tiles of at least 16 x 16 x 16: tl.dot in PRECISION (tensor
    cores for tf32 / bf16); smaller (one-row blocks, batch < 16): fp32 FMA, a broadcast product summed over K.
    K = 1 (a one-row block's weight gradient) is the outer product itself: summed, Triton 3.6 rewrote it into a
    tf32 tl.dot (its CombineBroadcastMulReducePattern), tensor cores in an ieee build (seen on an H200)."""
    if x.shape[1] == 1:
        return x * w_t
    if x.shape[0] < 16 or x.shape[1] < 16 or w_t.shape[1] < 16:
        return tl.sum(x[:, :, None] * w_t[None, :, :], axis=1)
    elif PRECISION == "bf16":
        if _EMULATE:  # the interpreter multiplies bfloat16 operands as integers (and truncates casts): round here
            return tl.dot(_bf16_round(x), _bf16_round(w_t), input_precision="ieee")
        else:
            return tl.dot(x.to(tl.bfloat16), w_t.to(tl.bfloat16))
    elif PRECISION == "tf32":
        if _EMULATE:  # the interpreter ignores input_precision: truncate as the tensor cores read tf32 operands
            return tl.dot(_tf32_truncate(x), _tf32_truncate(w_t), input_precision="ieee")
        else:
            return tl.dot(x, w_t, input_precision="tf32")
    else:
        return tl.dot(x, w_t, input_precision="ieee")


@triton.jit
def _weight_tile(w_ptr, row_stride, col0, k0, n0, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[n0 : n0 + BLOCK_N, col0 + k0 : col0 + k0 + BLOCK_K]^T as [BLOCK_K, BLOCK_N] for a row-major W of row
    stride `row_stride` (nn.Linear's [out, in] layout); entries past K (inputs from col0) or N (outputs) read as 0.
    Every weight matrix a kernel reads goes through this one load (build_analysis counts it)."""
    k = k0 + tl.arange(0, BLOCK_K)[:, None]
    n = n0 + tl.arange(0, BLOCK_N)[None, :]
    return tl.load(w_ptr + n * row_stride + col0 + k, mask=(k < K) & (n < N), other=0.0)


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
def _store_rows(ptr, x, row0, n_rows, n_cols, COLS_PAD: tl.constexpr, BLOCK_B: tl.constexpr, row_stride=None):
    """Store the [BLOCK_B, COLS_PAD] tile x into the first n_cols columns of rows row0.. of a row-major matrix
    (row stride n_cols unless given); padding rows and columns are not written."""
    if row_stride is None:
        row_stride = n_cols
    rows = row0 + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.arange(0, COLS_PAD)[None, :]
    tl.store(ptr + rows * row_stride + cols, x, mask=(rows < n_rows) & (cols < n_cols))


@triton.jit
def _hidden_layer(x_ptr, tx_ptr, w_ptr, b_ptr, y_ptr, ty_ptr, slope_ptr, H, H_PAD: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  WITH_TANGENT: tl.constexpr, SAVE_SLOPE: tl.constexpr):
    """y = mish(x W^T + b), and ty = mish'(pre) * (tx W^T), for one block of rows, scratch tiles to scratch tiles
    (row stride H_PAD). Each [BLOCK_K, BLOCK_N] weight tile is loaded once and feeds both products."""
    rows = tl.arange(0, BLOCK_B)[:, None] * H_PAD
    for n0 in range(0, H_PAD, BLOCK_N):
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        t_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H_PAD, BLOCK_K):
            w = _weight_tile(w_ptr, H, 0, k0, n0, H, H, BLOCK_K, BLOCK_N)
            cols = k0 + tl.arange(0, BLOCK_K)[None, :]
            acc += _mm(tl.load(x_ptr + rows + cols), w, PRECISION)
            if WITH_TANGENT:
                t_acc += _mm(tl.load(tx_ptr + rows + cols), w, PRECISION)
        y, slope = _mish_and_slope(acc + _vector(b_ptr, n0, H, BLOCK_N)[None, :])
        out = rows + n0 + tl.arange(0, BLOCK_N)[None, :]
        tl.store(y_ptr + out, y)
        if WITH_TANGENT:
            tl.store(ty_ptr + out, slope * t_acc)
        if SAVE_SLOPE:
            tl.store(slope_ptr + out, slope)
    tl.debug_barrier()  # the next layer reads columns other threads of this program wrote


@triton.jit
def _output_layer(x_ptr, tx_ptr, w_ptr, b_ptr, A, H, A_PAD: tl.constexpr, H_PAD: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WITH_TANGENT: tl.constexpr):
    """(x W^T + b, tx W^T) for the last Linear (no activation); the tangent is x's when WITH_TANGENT is off."""
    rows = tl.arange(0, BLOCK_B)[:, None] * H_PAD
    acc = tl.zeros([BLOCK_B, A_PAD], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_B, A_PAD], dtype=tl.float32)
    for k0 in range(0, H_PAD, BLOCK_K):
        w = _weight_tile(w_ptr, H, 0, k0, 0, H, A, BLOCK_K, A_PAD)
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        acc += _mm(tl.load(x_ptr + rows + cols), w, PRECISION)
        if WITH_TANGENT:
            t_acc += _mm(tl.load(tx_ptr + rows + cols), w, PRECISION)
    return acc + _vector(b_ptr, 0, A, A_PAD)[None, :], t_acc


@triton.jit
def _time_embedding(time, freqs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, DIM, DIM_PAD: tl.constexpr,
                    HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, PRECISION: tl.constexpr, WITH_TANGENT: tl.constexpr):
    """[sin(t f), cos(t f)] -> Linear(DIM, 2 DIM) -> Mish -> Linear(2 DIM, DIM) for a block of times, and with
    WITH_TANGENT its derivative in t (d sin = cos f, d cos = -sin f). Returns (emb, d emb)."""
    half = DIM // 2
    k = tl.arange(0, HALF_PAD)
    freqs = tl.load(freqs_ptr + k, mask=k < half, other=0.0)[None, :]
    arg = time[:, None] * freqs
    sin, cos = _sin_cos(arg)
    w_sin = _weight_tile(w1_ptr, DIM, 0, 0, 0, half, 2 * DIM, HALF_PAD, HID_PAD)
    w_cos = _weight_tile(w1_ptr, DIM, half, 0, 0, half, 2 * DIM, HALF_PAD, HID_PAD)
    w_out = _weight_tile(w2_ptr, 2 * DIM, 0, 0, 0, 2 * DIM, DIM, HID_PAD, DIM_PAD)
    pre = _mm(sin, w_sin, PRECISION) + _mm(cos, w_cos, PRECISION) + _vector(b1_ptr, 0, 2 * DIM, HID_PAD)[None, :]
    hidden, slope = _mish_and_slope(pre)
    emb = _mm(hidden, w_out, PRECISION) + _vector(b2_ptr, 0, DIM, DIM_PAD)[None, :]
    if WITH_TANGENT:
        d_pre = _mm(cos * freqs, w_sin, PRECISION) - _mm(sin * freqs, w_cos, PRECISION)
        d_emb = _mm(slope * d_pre, w_out, PRECISION)
    else:
        d_emb = emb
    return emb, d_emb


# ---------------------------------------------------------------------------------------------
# Weight sets: validated once, read in place at every launch
# ---------------------------------------------------------------------------------------------
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


def _check_inputs(device: torch.device, *inputs: tuple[str, torch.Tensor, tuple]):
    """Per-call checks of a launch's inputs: one fast test per tensor, the detailed message only on failure."""
    for name, x, shape in inputs:
        if x.dtype is not torch.float32 or x.shape != shape or x.device != device or not x.is_contiguous():
            _check(name, x, shape, device)


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


def _time_embedding_tensors(emb) -> tuple[int, list[torch.Tensor]]:
    """(dim, [freqs, W1, b1, W2, b2]) of an ofql.TimeEmbedding, checked (the Parameter objects themselves)."""
    first, second = _linear_mish_stack(emb.mlp, 2)
    dim = emb.freqs.numel() * 2
    if (first.in_features, first.out_features, second.out_features) != (dim, 2 * dim, dim):
        raise ValueError(f"expected ofql.TimeEmbedding's Linear({dim}, {2 * dim}) -> Mish -> Linear({2 * dim}, {dim})")
    return dim, [emb.freqs, first.weight, first.bias, second.weight, second.bias]


class _WeightSet:
    """Shared by ActorWeights and FoldedWeights: scratch buffers reused across calls, never deep-copied."""

    def __deepcopy__(self, memo):
        return None  # a deep copy of the module (an EMA target) must build its own, over its own parameters

    def scratch(self, numel: int) -> torch.Tensor:
        """A reused scratch buffer of at least `numel` floats (calls on one stream run in order). Under torch.compile
        a fresh one: a cached buffer made inside a CUDA graph is overwritten by the graph's next replay."""
        if torch.compiler.is_compiling():
            return torch.empty(numel, device=self.device)
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, device=self.device)
        return self._scratch


class ActorWeights(_WeightSet):
    """The kernels' view of an ofql.MeanFlowActor, validated once: the 18 tensors in kernel order ([freqs, W1, b1,
    W2, b2] of emb_r and of emb_t, then [W, b] of the 4 Linear layers), its sizes, device and precision.
    Holds the Parameter objects (no copies): in-place updates (optimiser steps, load_state_dict) show at the
    next launch. Rebuild it when the storage moves (`actor_weights` does) or shapes change."""

    def __init__(self, actor, precision: str = "auto"):
        linears = _linear_mish_stack(actor.net, 4)
        (dim, emb_r), (dim_t, emb_t) = _time_embedding_tensors(actor.emb_r), _time_embedding_tensors(actor.emb_t)
        if dim_t != dim:
            raise ValueError(f"the time embeddings of r and t must have one size, got {dim} and {dim_t}")
        self.net = [p for layer in linears for p in (layer.weight, layer.bias)]
        self.emb_r, self.emb_t = emb_r, emb_t
        self.tensors = emb_r + emb_t + self.net
        self.trainable = emb_r[1:] + emb_t[1:] + self.net  # actor.parameters() order: gradients route to these
        self.device = _check_params(self.tensors)
        self.precision = resolve_precision(precision, self.device)
        self.requested_precision = precision
        self.A, self.H, self.DIM = actor.act_dim, linears[0].out_features, dim
        self.S = linears[0].in_features - self.A - 2 * dim
        if self.S <= 0 or linears[3].out_features != self.A:
            raise ValueError(f"the actor's first layer takes {linears[0].in_features} inputs: not [z ({self.A}), "
                             f"emb(r) ({dim}), emb(t) ({dim}), obs]")
        self.act_tensors = self.tensors
        self.pads = {"A_PAD": _pad(self.A), "S_PAD": _pad(self.S), "H_PAD": _pad(self.H), **_time_embedding_pads(dim)}
        self._scratch = None


def actor_weights(actor) -> ActorWeights:
    """The weight set of an ofql.MeanFlowActor, built on first use and kept on the actor: optimiser steps and
    load_state_dict (in place) show without a rebuild; a change of actor.precision, or a move of its storage (.to(),
    .float(): they replace the `freqs` buffer), builds a new one; a deepcopy (the EMA target) builds its own."""
    weights = getattr(actor, "_kernel_weights", None)
    if weights is None or weights.requested_precision != actor.precision or weights.emb_r[0] is not actor.emb_r.freqs:
        weights = actor._kernel_weights = ActorWeights(actor, actor.precision)
    return weights


class FoldedWeights(_WeightSet):
    """The kernels' view of an eval.FoldedActor (r = 0, t = 1 already in the first bias), validated once."""

    def __init__(self, folded, precision: str = "auto"):
        linears = _linear_mish_stack(folded.net, 4)
        self.tensors = [p.detach() for layer in linears for p in (layer.weight, layer.bias)]
        self.device = _check_params(self.tensors)
        self.precision = resolve_precision(precision, self.device)
        self.A, self.H = folded.act_dim, linears[0].out_features
        self.S, self.DIM = linears[0].in_features - self.A, 0  # no time embedding: r = 0, t = 1 are in the bias
        # the act kernel's time-embedding arguments are then masked out: any pointers, ofql's pads (the same build)
        self.act_tensors = self.tensors[:2] * 5 + self.tensors
        self.pads = {"A_PAD": _pad(self.A), "S_PAD": _pad(self.S), "H_PAD": _pad(self.H), **_time_embedding_pads(16)}
        self._scratch = None


def _plane(batch: int, config: LaunchConfig, h_pad: int) -> tuple[int, int]:
    """(grid size, floats per [rows, H_PAD] scratch plane) for a call on `batch` rows."""
    grid = triton.cdiv(batch, config.block_b)
    plane = grid * config.block_b * h_pad
    if plane * 9 >= 2 ** 31:
        raise ValueError(f"batch {batch} is too large for the kernels' 32-bit offsets; split it")
    return grid, plane


# ---------------------------------------------------------------------------------------------
# 1. Time embedding: reference, kernel, launcher, backward kernel, autograd.Function
# ---------------------------------------------------------------------------------------------
def time_embedding_reference(time, freqs, w1, b1, w2, b2, precision: str = "ieee", with_tangent: bool = False):
    """ofql.TimeEmbedding over raw tensors: [sin(t f), cos(t f)] -> Linear -> Mish -> Linear; with_tangent also
    returns d emb / dt (operands rounded as `precision`)."""
    arg = time[:, None] * freqs
    sin, cos = arg.sin(), arg.cos()
    hidden, slope = mish_and_slope_reference(linear_reference(torch.cat([sin, cos], -1), w1, b1, precision))
    emb = linear_reference(hidden, w2, b2, precision)
    if not with_tangent:
        return emb
    d_pre = linear_reference(torch.cat([cos * freqs, -sin * freqs], -1), w1, None, precision)
    return emb, linear_reference(slope * d_pre, w2, None, precision)


@triton.jit
def _time_embedding_kernel(time_ptr, freqs, w1, b1, w2, b2, out_ptr, B, DIM, DIM_PAD: tl.constexpr,
                           HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                           PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    time = tl.load(time_ptr + rows, mask=rows < B, other=0.0)
    emb, _ = _time_embedding(time, freqs, w1, b1, w2, b2, DIM, DIM_PAD, HALF_PAD, HID_PAD, PRECISION, False)
    _store_rows(out_ptr, emb, tl.program_id(0) * BLOCK_B, B, DIM, DIM_PAD, BLOCK_B)


def _time_embedding_pads(dim: int) -> dict:
    return {"DIM_PAD": _pad(dim), "HALF_PAD": _pad(dim // 2), "HID_PAD": _pad(2 * dim)}


def time_embedding_triton(emb, time: torch.Tensor, out: torch.Tensor | None = None,
                          precision: str = "auto") -> torch.Tensor:
    """Launcher: emb(time) for an ofql.TimeEmbedding `emb` and times [B]; returns [B, dim]. No autograd."""
    dim, params = _time_embedding_tensors(emb)
    device = _check_params(params)
    B = time.shape[0] if time.dim() == 1 else -1
    _check("time", time, (B,), device)
    out = torch.empty(B, dim, device=device) if out is None else out
    _check("out", out, (B, dim), device)
    config = time_embedding_config(B)
    _time_embedding_kernel[(triton.cdiv(B, config.block_b),)](
        time, *params, out, B, dim, **_time_embedding_pads(dim), BLOCK_B=config.block_b,
        PRECISION=kernel_precision(config, resolve_precision(precision, device)), num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


@triton.jit
def _time_embedding_backward_kernel(time_ptr, grad_ptr, freqs, w1, b1, w2, b2, grad_time_ptr, partial_ptr, B, DIM,
                                    DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr,
                                    BLOCK_B: tl.constexpr, PRECISION: tl.constexpr):
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
    sin, cos = _sin_cos(arg)
    w_sin = _weight_tile(w1, DIM, 0, 0, 0, half, hid, HALF_PAD, HID_PAD)  # [HALF_PAD, HID_PAD] = W1[:, :half]^T
    w_cos = _weight_tile(w1, DIM, half, 0, 0, half, hid, HALF_PAD, HID_PAD)
    pre = _mm(sin, w_sin, PRECISION) + _mm(cos, w_cos, PRECISION) + _vector(b1, 0, hid, HID_PAD)[None, :]
    hidden, slope = _mish_and_slope(pre)
    # backward: d hidden = grad W2, d pre = mish'(pre) d hidden, d [sin, cos] = d pre W1
    w2_tile = tl.trans(_weight_tile(w2, hid, 0, 0, 0, hid, DIM, HID_PAD, DIM_PAD))  # [DIM_PAD, HID_PAD] = W2
    d_pre = slope * _mm(grad, w2_tile, PRECISION)
    d_sin = _mm(d_pre, tl.trans(w_sin), PRECISION)
    d_cos = _mm(d_pre, tl.trans(w_cos), PRECISION)
    tl.store(grad_time_ptr + rows, tl.sum((d_sin * cos - d_cos * sin) * f, 1), mask=rows < B)
    # this block's weight gradients
    j, k = tl.arange(0, HID_PAD)[:, None], tl.arange(0, HALF_PAD)[None, :]
    in_w1 = (j < hid) & (k < half)
    out = partial_ptr + tl.program_id(0) * (2 * hid * DIM + hid + DIM)
    tl.store(out + j * DIM + k, _mm(tl.trans(d_pre), sin, PRECISION), mask=in_w1)
    tl.store(out + j * DIM + half + k, _mm(tl.trans(d_pre), cos, PRECISION), mask=in_w1)
    n = tl.arange(0, HID_PAD)
    tl.store(out + hid * DIM + n, tl.sum(d_pre, 0), mask=n < hid)
    i, j = tl.arange(0, DIM_PAD)[:, None], tl.arange(0, HID_PAD)[None, :]
    tl.store(out + hid * DIM + hid + i * hid + j, _mm(tl.trans(grad), hidden, PRECISION),
             mask=(i < DIM) & (j < hid))
    n = tl.arange(0, DIM_PAD)
    tl.store(out + 2 * hid * DIM + hid + n, tl.sum(grad, 0), mask=n < DIM)


def _time_embedding_backward(params: list[torch.Tensor], dim: int, time: torch.Tensor, grad: torch.Tensor,
                             precision: str):
    """(d time [B], [dW1, db1, dW2, db2]) of sum(grad * emb(time)); params = [freqs, W1, b1, W2, b2], checked."""
    B, device = time.shape[0], time.device
    config = time_embedding_config(B)
    grid = (triton.cdiv(B, config.block_b),)
    grad_time = torch.empty(B, device=device)
    partial = torch.empty(grid[0], 4 * dim * dim + 3 * dim, device=device)
    _time_embedding_backward_kernel[grid](time, grad, *params, grad_time, partial, B, dim, **_time_embedding_pads(dim),
                                          BLOCK_B=config.block_b, PRECISION=kernel_precision(config, precision),
                                          num_warps=config.num_warps,
                                          num_stages=config.num_stages)
    sizes = [p.numel() for p in params[1:]]
    return grad_time, [g.view_as(p) for g, p in zip(partial.sum(0).split(sizes), params[1:])]


def time_embedding_backward_triton(emb, time: torch.Tensor, grad: torch.Tensor, precision: str = "auto"):
    """Launcher: (d time [B], [dW1, db1, dW2, db2]) of sum(grad * emb(time)) for an ofql.TimeEmbedding."""
    dim, params = _time_embedding_tensors(emb)
    device = _check_params(params)
    B = time.shape[0] if time.dim() == 1 else -1
    _check("time", time, (B,), device)
    _check("grad", grad, (B, dim), device)
    return _time_embedding_backward(params, dim, time, grad, resolve_precision(precision, device))


class TimeEmbeddingFunction(torch.autograd.Function):
    """Triton forward and backward; only the times are saved, the backward kernel recomputes the
    forward (two tiny layers) instead of keeping activations between the passes."""

    @staticmethod
    def forward(ctx, time, emb, precision, *weights):
        ctx.emb, ctx.precision = emb, precision
        ctx.save_for_backward(time)
        return time_embedding_triton(emb, time, precision=precision)

    @staticmethod
    def backward(ctx, grad):
        (time,) = ctx.saved_tensors
        grad_time, grad_weights = time_embedding_backward_triton(ctx.emb, time, grad.contiguous(), ctx.precision)
        return grad_time, None, None, *grad_weights


def time_embedding(emb, time: torch.Tensor, backend: str = "auto", precision: str = "auto") -> torch.Tensor:
    """emb(time) with gradients for `emb`'s weights and `time`: the fused kernel or the torch reference."""
    if resolve_backend(backend, time.device) == "triton":
        return TimeEmbeddingFunction.apply(time, emb, precision, *emb.parameters())
    return emb(time)


# ---------------------------------------------------------------------------------------------
# 2. One-step actor (inference): reference, kernel, launchers
# ---------------------------------------------------------------------------------------------
def folded_actor_reference(noise, obs, w0, b0, w1, b1, w2, b2, w3, b3, precision: str = "ieee"):
    """eval.FoldedActor over raw tensors: a = clip(e - mlp([e, s]), -1, 1)."""
    x = torch.cat([noise, obs], -1)
    for w, b in ((w0, b0), (w1, b1), (w2, b2)):
        x = mish_and_slope_reference(linear_reference(x, w, b, precision))[0]
    return (noise - linear_reference(x, w3, b3, precision)).clamp(-1.0, 1.0)


def act_reference(tensors: list[torch.Tensor], obs, noise, precision: str = "ieee"):
    """ofql.MeanFlowActor.act over its 18 raw tensors (ActorWeights order): clip(e - u(e, 0, 1; s), -1, 1)."""
    ones = torch.ones(obs.shape[0], device=obs.device)
    return (noise - velocity_reference(tensors, noise, 0 * ones, ones, obs, precision=precision)[0]).clamp(-1.0, 1.0)


@triton.jit
def _act_kernel(noise_ptr, obs_ptr, fr, wr1, br1, wr2, br2, ft, wt1, bt1, wt2, bt2, w0, b0, w1, b1, w2, b2, w3, b3,
                action_ptr, scratch_ptr, B, A, S, H, DIM, PLANE, A_PAD: tl.constexpr, S_PAD: tl.constexpr,
                H_PAD: tl.constexpr, DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """a = clip(e - u(e, 0, 1; s), -1, 1) for one block of rows. w0 is the first layer over [e, emb(r), emb(t), s];
    the constant embeddings emb_r(0), emb_t(1) are computed here (one row) and folded into its bias. An
    eval.FoldedActor (embeddings already in its bias) runs with DIM = 0: every time-embedding tile is then masked
    out (no load issued) and the same build serves both."""
    row0 = tl.program_id(0) * BLOCK_B
    noise = _rows(noise_ptr, row0, B, A, A_PAD, BLOCK_B)
    obs = _rows(obs_ptr, row0, B, S, S_PAD, BLOCK_B)
    h0 = scratch_ptr + row0 * H_PAD  # this program's rows of the three hidden-activation planes
    h1, h2 = h0 + PLANE, h0 + 2 * PLANE
    row_stride = A + 2 * DIM + S
    zero = tl.zeros([1], dtype=tl.float32)
    emb_r, _r = _time_embedding(zero, fr, wr1, br1, wr2, br2, DIM, DIM_PAD, HALF_PAD, HID_PAD, PRECISION, False)
    emb_t, _t = _time_embedding(zero + 1.0, ft, wt1, bt1, wt2, bt2, DIM, DIM_PAD, HALF_PAD, HID_PAD, PRECISION, False)
    offsets = tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, BLOCK_N)[None, :]
    for n0 in range(0, H_PAD, BLOCK_N):  # first layer: [e, s] products, the one-row embeddings in the bias
        bias = (_vector(b0, n0, H, BLOCK_N)[None, :]
                + _mm(emb_r, _weight_tile(w0, row_stride, A, 0, n0, DIM, H, DIM_PAD, BLOCK_N), PRECISION)
                + _mm(emb_t, _weight_tile(w0, row_stride, A + DIM, 0, n0, DIM, H, DIM_PAD, BLOCK_N), PRECISION))
        pre = (_mm(noise, _weight_tile(w0, row_stride, 0, 0, n0, A, H, A_PAD, BLOCK_N), PRECISION)
               + _mm(obs, _weight_tile(w0, row_stride, A + 2 * DIM, 0, n0, S, H, S_PAD, BLOCK_N), PRECISION) + bias)
        y, slope = _mish_and_slope(pre)
        tl.store(h0 + n0 + offsets, y)
    tl.debug_barrier()
    _hidden_layer(h0, h0, w1, b1, h1, h1, h1, H, H_PAD, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION, False, False)
    _hidden_layer(h1, h1, w2, b2, h2, h2, h2, H, H_PAD, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION, False, False)
    u, _u = _output_layer(h2, h2, w3, b3, A, H, A_PAD, H_PAD, BLOCK_B, BLOCK_K, PRECISION, False)
    action = tl.minimum(tl.maximum(noise - u, -1.0), 1.0)
    _store_rows(action_ptr, action, row0, B, A, A_PAD, BLOCK_B)


def _launch_act(weights, obs: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None):
    A, S, device = weights.A, weights.S, weights.device
    B = obs.shape[0] if obs.dim() == 2 else -1
    out = torch.empty(B, A, device=device) if out is None else out
    _check_inputs(device, ("obs", obs, (B, S)), ("noise", noise, (B, A)), ("out", out, (B, A)))
    config, pads = launch_config(B, weights.precision), weights.pads
    grid, plane = _plane(B, config, pads["H_PAD"])
    _act_kernel[(grid,)](noise, obs, *weights.act_tensors, out, weights.scratch(3 * plane), B, A, S, weights.H,
                         weights.DIM, plane, **pads, BLOCK_B=config.block_b, BLOCK_N=min(config.block_n, pads["H_PAD"]),
                         BLOCK_K=min(config.block_k, pads["H_PAD"]), PRECISION=kernel_precision(config, weights.precision),
                         num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def act(weights: ActorWeights, obs: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One-step actions clip(e - u(e, 0, 1; s), -1, 1) [B, A] of an ofql.MeanFlowActor's weight set, in one launch
    (r = 0, t = 1 folded into the first bias inside the kernel). No autograd graph."""
    return _launch_act(weights, obs, noise, out)


def folded_actor_triton(folded, obs: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None,
                        precision: str = "auto") -> torch.Tensor:
    """Launcher of the inference actor for an eval.FoldedActor (validates its weights at every call: for a hot
    loop, use `folded_policy`); returns actions [B, A]."""
    return _launch_act(FoldedWeights(folded, precision), obs, noise, out)


def folded_policy(folded, backend: str = "auto",
                  precision: str = "auto") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """policy(obs [B, S] float32, noise [B, A] float32) -> actions [B, A] in [-1, 1], no autograd graph,
    on the device of `folded` (an eval.FoldedActor). The backend is resolved and the weights are checked
    once, here (per call only obs and noise are); the policy reads the current values of `folded`'s parameters at
    every call (in-place updates show, replaced tensors do not)."""
    device = next(folded.parameters()).device
    if resolve_backend(backend, device) == "triton":
        weights = FoldedWeights(folded, precision)
        return lambda obs, noise: _launch_act(weights, obs, noise, None)
    return torch.no_grad()(folded.forward)


# ---------------------------------------------------------------------------------------------
# 3. Velocity and JVP: reference, kernel, launchers, autograd.Function (training)
# ---------------------------------------------------------------------------------------------
def velocity_reference(tensors: list[torch.Tensor], z, r, t, obs, v=None, precision: str = "ieee"):
    """ofql.MeanFlowActor over its 18 raw tensors (ActorWeights order): (u(z, r, t; s), du/dt) with du/dt =
    v . d_z u + d_t u by dual numbers (tangents (v, 0, 1) for (z, r, t)); du/dt is None without v."""
    emb_r_tensors, emb_t_tensors, net = tensors[:5], tensors[5:10], tensors[10:]
    emb_r = time_embedding_reference(r, *emb_r_tensors, precision=precision)
    emb_t, d_emb_t = time_embedding_reference(t, *emb_t_tensors, precision=precision, with_tangent=True)
    x = torch.cat([z, emb_r, emb_t, obs], -1)
    tangent = None if v is None else torch.cat([v, torch.zeros_like(emb_r), d_emb_t, torch.zeros_like(obs)], -1)
    for i in range(0, 6, 2):
        x, slope = mish_and_slope_reference(linear_reference(x, net[i], net[i + 1], precision))
        if tangent is not None:
            tangent = slope * linear_reference(tangent, net[i], None, precision)
    u = linear_reference(x, net[6], net[7], precision)
    return u, (None if tangent is None else linear_reference(tangent, net[6], None, precision))


@triton.jit
def _velocity_kernel(z_ptr, r_ptr, t_ptr, obs_ptr, v_ptr, fr, wr1, br1, wr2, br2, ft, wt1, bt1, wt2, bt2,
                     w0, b0, w1, b1, w2, b2, w3, b3, u_ptr, dudt_ptr, emb_ptr, hidden_ptr, B, A, S, H, DIM, PLANE,
                     A_PAD: tl.constexpr, S_PAD: tl.constexpr, H_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                     HALF_PAD: tl.constexpr, HID_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """u and du/dt for one block of rows, and what the backward needs: hidden_ptr is [9, rows, H_PAD] fp32, planes
    0-2 the hidden activations, 3-5 their tangents, 6-8 the Mish slopes; emb_ptr [B, 2 DIM] gets [emb(r), emb(t)].
    Every weight tile is loaded once and feeds the primal and the tangent products."""
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    z = _rows(z_ptr, row0, B, A, A_PAD, BLOCK_B)
    v = _rows(v_ptr, row0, B, A, A_PAD, BLOCK_B)
    obs = _rows(obs_ptr, row0, B, S, S_PAD, BLOCK_B)
    r = tl.load(r_ptr + rows, mask=rows < B, other=0.0)
    t = tl.load(t_ptr + rows, mask=rows < B, other=0.0)
    emb_r, _r = _time_embedding(r, fr, wr1, br1, wr2, br2, DIM, DIM_PAD, HALF_PAD, HID_PAD, PRECISION, False)
    emb_t, d_emb_t = _time_embedding(t, ft, wt1, bt1, wt2, bt2, DIM, DIM_PAD, HALF_PAD, HID_PAD, PRECISION, True)
    _store_rows(emb_ptr, emb_r, row0, B, DIM, DIM_PAD, BLOCK_B, 2 * DIM)  # [emb(r), emb(t)]: rows of 2 DIM
    _store_rows(emb_ptr + DIM, emb_t, row0, B, DIM, DIM_PAD, BLOCK_B, 2 * DIM)
    h0 = hidden_ptr + row0 * H_PAD
    h1, h2 = h0 + PLANE, h0 + 2 * PLANE
    th0, th1, th2 = h0 + 3 * PLANE, h0 + 4 * PLANE, h0 + 5 * PLANE
    s0, s1, s2 = h0 + 6 * PLANE, h0 + 7 * PLANE, h0 + 8 * PLANE
    row_stride = A + 2 * DIM + S  # first layer input: [z, emb(r), emb(t), s]
    offsets = tl.arange(0, BLOCK_B)[:, None] * H_PAD + tl.arange(0, BLOCK_N)[None, :]
    for n0 in range(0, H_PAD, BLOCK_N):
        w_z = _weight_tile(w0, row_stride, 0, 0, n0, A, H, A_PAD, BLOCK_N)
        w_r = _weight_tile(w0, row_stride, A, 0, n0, DIM, H, DIM_PAD, BLOCK_N)
        w_t = _weight_tile(w0, row_stride, A + DIM, 0, n0, DIM, H, DIM_PAD, BLOCK_N)
        w_s = _weight_tile(w0, row_stride, A + 2 * DIM, 0, n0, S, H, S_PAD, BLOCK_N)
        pre = (_mm(z, w_z, PRECISION) + _mm(emb_r, w_r, PRECISION) + _mm(emb_t, w_t, PRECISION)
               + _mm(obs, w_s, PRECISION) + _vector(b0, n0, H, BLOCK_N)[None, :])
        y, slope = _mish_and_slope(pre)
        tl.store(h0 + n0 + offsets, y)
        # tangent of the input: (v, 0, d emb(t)/dt, 0), through the same tiles
        tl.store(th0 + n0 + offsets, slope * (_mm(v, w_z, PRECISION) + _mm(d_emb_t, w_t, PRECISION)))
        tl.store(s0 + n0 + offsets, slope)
    tl.debug_barrier()
    _hidden_layer(h0, th0, w1, b1, h1, th1, s1, H, H_PAD, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION, True, True)
    _hidden_layer(h1, th1, w2, b2, h2, th2, s2, H, H_PAD, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION, True, True)
    u, dudt = _output_layer(h2, th2, w3, b3, A, H, A_PAD, H_PAD, BLOCK_B, BLOCK_K, PRECISION, True)
    _store_rows(u_ptr, u, row0, B, A, A_PAD, BLOCK_B)
    _store_rows(dudt_ptr, dudt, row0, B, A, A_PAD, BLOCK_B)


HIDDEN_PLANES = 9  # activations, tangents, Mish slopes of the 3 hidden layers


def _launch_velocity(weights: ActorWeights, z, r, t, obs, v, out=None, keep: bool = False):
    """(u, du/dt, [emb(r), emb(t)], hidden planes [9, rows, H_PAD]); keep: fresh buffers for the backward (else the
    weight set's reused scratch)."""
    A, S, device = weights.A, weights.S, weights.device
    B = z.shape[0] if z.dim() == 2 else -1
    u, dudt = out if out is not None else (torch.empty(B, A, device=device), torch.empty(B, A, device=device))
    _check_inputs(device, ("z", z, (B, A)), ("r", r, (B,)), ("t", t, (B,)), ("obs", obs, (B, S)), ("v", v, (B, A)),
                  ("out u", u, (B, A)), ("out du/dt", dudt, (B, A)))
    config, pads = launch_config(B, weights.precision), weights.pads
    grid, plane = _plane(B, config, pads["H_PAD"])
    numel, emb_numel = HIDDEN_PLANES * plane, B * 2 * weights.DIM
    buffer = torch.empty(numel + emb_numel, device=device) if keep else weights.scratch(numel + emb_numel)
    hidden, emb = buffer[:numel], buffer[numel:numel + emb_numel].view(B, 2 * weights.DIM)
    _velocity_kernel[(grid,)](z, r, t, obs, v, *weights.tensors, u, dudt, emb, hidden, B, A, S, weights.H, weights.DIM,
                              plane, **pads, BLOCK_B=config.block_b, BLOCK_N=min(config.block_n, pads["H_PAD"]),
                              BLOCK_K=min(config.block_k, pads["H_PAD"]), PRECISION=kernel_precision(config, weights.precision),
                              num_warps=config.num_warps, num_stages=config.num_stages)
    return u, dudt, emb, hidden.view(HIDDEN_PLANES, -1, pads["H_PAD"])


def velocity(weights: ActorWeights, z, r, t, obs, v=None, out=None):
    """(u, du/dt) of an ofql.MeanFlowActor's weight set in one launch, du/dt = v . d_z u + d_t u (tangents (v, 0, 1)
    for (z, r, t)). No autograd graph. With v=None, du/dt is None (the kernel runs with v = 0: one build serves
    every use; inference actions have `act`)."""
    if v is None:
        u = out[0] if out is not None else None
        return _launch_velocity(weights, z, r, t, obs, torch.zeros_like(z), None if u is None else (u, torch.empty_like(u)))[0], None
    return _launch_velocity(weights, z, r, t, obs, v, out)[:2]


def fused_velocity(actor, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor,
                   v: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   precision: str = "auto"):
    """`velocity` for an ofql.MeanFlowActor given as a module (builds and validates its weight set at every
    call; hot paths keep an ActorWeights, as `actor_weights` does)."""
    return velocity(ActorWeights(actor, precision), z, r, t, obs, v, out)


class VelocityJVPFunction(torch.autograd.Function):
    """Training's u and du/dt in one kernel launch: u carries gradients, du/dt (a stop-gradient target) does not.
    The kernel saves the hidden activations, Mish slopes and time embeddings; the backward is torch matmuls over
    them plus the time-embedding backward kernel, so the forward is never run twice."""

    @staticmethod
    def forward(ctx, weights: ActorWeights, z, r, t, obs, v, *trainable):
        u, dudt, emb, hidden = _launch_velocity(weights, z, r, t, obs, v, keep=True)
        ctx.weights = weights
        ctx.save_for_backward(z, r, t, obs, emb, hidden)
        ctx.mark_non_differentiable(dudt)
        return u, dudt

    @staticmethod
    def backward(ctx, grad_u, _grad_dudt):
        z, r, t, obs, emb, hidden = ctx.saved_tensors
        weights = ctx.weights
        B, A, H, DIM = z.shape[0], weights.A, weights.H, weights.DIM
        w0, _, w1, _, w2, _, w3, _ = (p.detach() for p in weights.net)
        acts, slopes = hidden[:3, :B, :H], hidden[6:, :B, :H]
        grads = []  # [dW, db] per Linear, last layer first
        d = grad_u
        for i, w in ((2, w3), (1, w2), (0, w1)):
            grads += [d.T @ acts[i], d.sum(0)]
            d = (d @ w) * slopes[i]
        x0 = torch.cat([z, emb, obs], -1)
        grads += [d.T @ x0, d.sum(0)]
        d_x0 = d @ w0
        d_z, d_emb_r, d_emb_t, d_obs = d_x0.split([A, DIM, DIM, weights.S], -1)
        d_r, grads_r = _time_embedding_backward(weights.emb_r, DIM, r, d_emb_r.contiguous(), weights.precision)
        d_t, grads_t = _time_embedding_backward(weights.emb_t, DIM, t, d_emb_t.contiguous(), weights.precision)
        dw3, db3, dw2, db2, dw1, db1, dw0, db0 = grads
        needs = ctx.needs_input_grad
        return (None, d_z if needs[1] else None, d_r if needs[2] else None, d_t if needs[3] else None,
                d_obs if needs[4] else None, None, *grads_r, *grads_t, dw0, db0, dw1, db1, dw2, db2, dw3, db3)


def velocity_and_dudt(weights: ActorWeights, z, r, t, obs, v):
    """Training's (u, du/dt): u with gradients for the actor's parameters (and z, r, t, obs where they need them),
    du/dt without (stop-gradient); one kernel launch forward, torch matmuls backward (VelocityJVPFunction)."""
    if torch.is_grad_enabled():
        return VelocityJVPFunction.apply(weights, z, r, t, obs, v, *weights.trainable)
    return velocity(weights, z, r, t, obs, v)


# ---------------------------------------------------------------------------------------------
# What the compiled code proves (no GPU needed)
# ---------------------------------------------------------------------------------------------
KERNEL_BUILDS = {  # name: the kernel (one build per launch config and precision; act also serves FoldedActor)
    "act": "_act_kernel",
    "velocity + du/dt": "_velocity_kernel",
    "time embedding": "_time_embedding_kernel",
    "time embedding backward": "_time_embedding_backward_kernel",
}
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block (CUDA guide)
TENSOR_CORE_SASS = ("HMMA", "HGMMA")  # mma.sync / wgmma (sm_90) in SASS


def _bundled_tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name).path


def compile_kernel(name: str, capability: int, config: LaunchConfig, precision: str, obs_dim: int = 17,
                   act_dim: int = 6, hidden: int = 256, time_dim: int = 16):
    """Triton's compiled kernel (ttir, ptx, cubin, metadata) of KERNEL_BUILDS[name] for an NVIDIA GPU of this
    compute capability (90 = H100, 80 = A100), built on this machine with Triton's bundled ptxas."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = globals()[KERNEL_BUILDS[name]]
    h_pad = _pad(hidden)
    values = {"A_PAD": _pad(act_dim), "S_PAD": _pad(obs_dim), "H_PAD": h_pad, "BLOCK_B": config.block_b,
              "BLOCK_N": min(config.block_n, h_pad), "BLOCK_K": min(config.block_k, h_pad),
              "PRECISION": precision, **_time_embedding_pads(time_dim)}
    constants = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
    # arguments named in capitals (B, A, S, H, DIM, PLANE) are sizes, the others float32 pointers
    signature = {p.name: "constexpr" if p.is_constexpr else "i32" if p.name.isupper() else "*fp32"
                 for p in kernel.params}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _weight_tile_line() -> int:
    return next(i for i, text in enumerate(_SOURCE_LINES, 1) if "return tl.load(w_ptr + n * row_stride" in text)


def _weight_tile_loads(ttir: str) -> int:
    """tt.load operations of the compiled kernel's TTIR (loops not unrolled) whose location is _weight_tile's load."""
    line = _weight_tile_line()
    locs = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)$", ttir, re.M))

    def innermost_line(ref: str) -> int | None:
        text = locs.get(ref, ref)
        while (m := re.match(r"callsite\((#loc\d+) at", text)) is not None:
            text = locs.get(m.group(1), "")
        m = re.search(r'kernels\.py":(\d+):', text)
        return int(m.group(1)) if m else None

    loads = re.findall(r"= tt\.load .* loc\((#loc\d+)\)$", ttir, re.M)
    return sum(innermost_line(ref) == line for ref in loads)


with open(__file__) as _f:
    _SOURCE_LINES = _f.read().splitlines()


def analyse_build(compiled) -> dict:
    """Registers, spills and local memory (cuobjdump -res-usage, SASS LDL/STL), shared memory, tensor-core
    instructions and global loads (SASS), and weight-tile loads (TTIR) of one compiled kernel."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bundled_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_bundled_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        annotated = subprocess.run([_bundled_tool("nvdisasm"), "--print-line-info", f.name], capture_output=True,
                                   text=True, check=True).stdout
    line, weight_line_loads = None, 0  # SASS global loads attributed to _weight_tile's line (-lineinfo builds)
    for text in annotated.splitlines():
        m = re.match(r'\s*//## File ".*kernels\.py", line (\d+)', text)
        if m:
            line = int(m.group(1))
        elif line == _weight_tile_line() and re.search(r"\bLDG(STS)?\b", text):
            weight_line_loads += 1
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass)
    count = lambda *names: sum(op in names for op in opcodes)  # noqa: E731
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "local_bytes": int(fields["LOCAL"]),
            "spill_instructions": count("LDL", "STL"), "shared_bytes": compiled.metadata.shared,
            "tensor_core_instructions": count(*TENSOR_CORE_SASS), "hmma": count("HMMA"), "hgmma": count("HGMMA"),
            "ffma": count("FFMA"),
            "global_loads": count("LDG", "LDGSTS"), "async_copies": count("LDGSTS"),
            "weight_tile_loads": _weight_tile_loads(compiled.asm["ttir"]), "weight_tile_sass_loads": weight_line_loads}


def shipped_builds(names=tuple(KERNEL_BUILDS), precisions=PRECISIONS) -> list[tuple[str, int, LaunchConfig, str]]:
    """(kernel name, smallest batch, config, precision) of every build the launchers can ask for: each LAUNCH_TABLE
    row (time_embedding_config's for the time-embedding kernels) in each of its precisions, as launched
    (kernel_precision: one-row blocks are one ieee build)."""
    builds = []
    for name in names:
        seen = set()
        for smallest, row_precisions, _ in LAUNCH_TABLE:
            for precision in (p for p in precisions if p in row_precisions):
                config = (time_embedding_config(smallest) if name.startswith("time embedding")
                          else launch_config(smallest, precision))
                key = (config, kernel_precision(config, precision))
                if key not in seen:
                    seen.add(key)
                    builds.append((name, smallest, *key))
    return builds


def build_analysis(capabilities=(90, 80), precisions=PRECISIONS, names=tuple(KERNEL_BUILDS), **dims) -> list[dict]:
    """Compile every shipped build (shipped_builds) for each GPU in `capabilities` and analyse it (analyse_build).
    Needs TRITON_INTERPRET unset (kernels decorated for the interpreter cannot be compiled). Builds are cached by
    Triton in ~/.triton."""
    if INTERPRETED:
        raise RuntimeError("build_analysis needs TRITON_INTERPRET unset before kernels is imported")
    jobs = [(capability, *build) for capability in capabilities for build in shipped_builds(names, precisions)]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # ptxas is the slow part
        return list(pool.map(_analyse_one, jobs, [dims] * len(jobs)))


def _analyse_one(job: tuple, dims: dict) -> dict:
    capability, name, smallest, config, precision = job
    compiled = compile_kernel(name, capability, config, precision, **dims)
    return {"kernel": name, "arch": f"sm_{capability}", "batch_from": smallest, "block_b": config.block_b,
            "num_warps": config.num_warps, "num_stages": config.num_stages, "precision": precision,
            **analyse_build(compiled)}


def print_build_analysis(rows: list[dict]):
    keys = ["kernel", "arch", "batch_from", "block_b", "num_warps", "num_stages", "precision", "registers",
            "spill_instructions", "stack_bytes", "local_bytes", "shared_bytes", "hmma", "hgmma", "ffma", "global_loads",
            "async_copies", "weight_tile_loads", "weight_tile_sass_loads"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    print_build_analysis(build_analysis())
