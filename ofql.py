"""One-Step Flow Q-Learning (OFQL), single-file reference implementation.

OFQL (Nguyen & Yoo, arXiv 2508.13904) is Diffusion Q-Learning with the DDPM policy replaced by a MeanFlow
*average-velocity* policy u(z, r, t; s). One network call turns noise into an action:

    a = clip(e - u(e, r=0, t=1; s), -1, 1),   e ~ N(0, I)

Time convention: z_t = (1 - t) a + t e, t = 1 is noise, velocity v = e - a, 0 <= r <= t <= 1. Behaviour cloning
regresses u onto the MeanFlow identity  u = v - (t - r) du/dt,  where du/dt = v . d_z u + d_t u is a forward-mode
derivative (tangents (v, 0, 1) for (z, r, t)). The actor loss is  L_BC - eta * Q(s, a_pi) / E|Q|;  twin critics: DQL's.

`python ofql.py --help` lists every option; `ofql.train(args, data=..., make_env=...)` trains on your own arrays
(docs/own_data.md); task names load through the data modules next to this file (docs/data.md).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Iterator, Literal, get_args, get_origin, get_type_hints

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

try:  # optional fused Triton kernels (kernels.py next to this file); without them --kernels auto means torch
    import kernels
    KERNELS_IMPORT_ERROR = None
except ImportError as error:
    kernels, KERNELS_IMPORT_ERROR = None, error


# ---- Configuration -------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    """OFQL's options (docs/flags.md); the comparison baselines' are `python baselines.py train --help`."""

    env: str = "pendulum-swingup"
    """task (docs/data.md): a built-in, D4RL, Minari (id or folder) or `ogbench/` name; with train(data=...) yours"""
    preset: Literal["ofql", "paper"] = "ofql"
    """unset flags from this project's presets (`ofql`), or from what the paper ran (`paper`: DQL's; docs/algorithm.md)"""
    d4rl_mirror: str | None = None
    """base URL (https://, file://) of D4RL's HDF5 files (None: $OFQL_D4RL_MIRROR, else Berkeley's); docs/data.md"""
    seed: int = 0
    """seed of torch, numpy and python RNGs (one seeding block in `train`)"""
    exp_name: str = "ofql"
    """name of this experiment, part of the run folder's name"""
    out_dir: str = "runs"
    """parent folder of run folders (checkpoints, summary.json, TensorBoard events)"""
    run_dir: str | None = None
    """exact run folder instead of a fresh one under out_dir (sweep.py's); it may exist but hold no checkpoint"""
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu` or `cuda`"""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """actor kernels (u + du/dt, no-grad actions): kernels.py's `triton` (CUDA), `torch`, `auto` = torch (docs/kernels.md)"""
    kernel_precision: Literal["auto", "ieee", "tf32", "bf16"] = "auto"
    """Triton matmul inputs (fp32 sums): `ieee`, `tf32`/`bf16` (sm_80+, docs/kernels.md), `auto` = tf32 if any"""
    threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    compile: bool = False
    """torch.compile the gradient step (+ CUDA graphs on CUDA); the first two steps compile (docs/flags.md)"""
    track: bool = False
    """log to Weights & Biases as well (needs `wandb`)"""
    wandb_project: str = "ofql"
    """Weights & Biases project name, with --track"""
    resume: str | None = None
    """checkpoint file to continue from (its run folder is reused; its args win over the command line)"""
    # --- training
    total_steps: int | None = None
    """gradient steps (None: the task preset; paper: 1M)"""
    batch_size: int = 256
    """transitions per gradient step"""
    lr: float | None = None
    """actor learning rate (None: task preset, DQL: 3e-4)"""
    critic_lr: float | None = None
    """critic learning rate (None: task preset; DQL keeps 3e-4 for every task)"""
    lr_decay: bool | None = None
    """cosine-decay the actor and critic lr to 0 over --total-steps (None: task preset, on except the bandit)"""
    gamma: float | None = None
    """discount (None: task preset: 0.995 on MuJoCo, else DQL's 0.99; FQL's on OGBench, docs/ogbench.md)"""
    tau: float | None = None
    """Polyak rate of the target critics (None: task preset, 0.02 on MuJoCo, else DQL's 0.005)"""
    grad_norm: float | None = None
    """max gradient norm of actor and critic (None: task preset; <= 0 disables clipping)"""
    eta: float | None = None
    """weight of the Q term in the actor loss, L_BC - eta Q / E|Q| (None: task preset)"""
    normalize_q: bool | None = None
    """divide the Q term by sg(E|Q|) (DQL, the paper); False: eta weights the raw Q, as FQL does (None: preset, True)"""
    target_q: Literal["min", "mean"] | None = None
    """twin target heads in the TD target: DQL's `min`, or FQL's `mean` on OGBench (None: task preset)"""
    max_q_backup: bool | None = None
    """TD target from the max over `max_q_samples` next actions per head (None: task preset)"""
    max_q_samples: int = 10
    """next-action samples for the max-Q backup (DQL: 10)"""
    target_noise_scale: float = 1.0
    """std of the TD target's next-action noise (1: the trained policy, the paper's; < 1: ours, a less noisy one)"""
    ema_actor: Annotated[bool, tyro.conf.FlagConversionOff] = False
    """use an EMA copy of the actor for next actions (DQL's); the paper's OFQL uses the current actor"""
    ema_decay: float = 0.995
    """EMA decay of the target actor"""
    ema_start: int = 1000
    """step after which the EMA actor starts tracking (before: a plain copy)"""
    ema_every: int = 5
    """steps between EMA updates"""
    eval_ema: Annotated[bool, tyro.conf.FlagConversionOff] = False
    """evaluate an EMA copy of the actor (--ema-* settings); training changes only if --ema-actor uses it too"""
    normalize_obs: bool | None = None
    """standardise observations with the dataset's mean/std, saved in the checkpoint (None: preset; paper: raw, DQL's)"""
    reward_scale: float | None = None
    """reward -> (reward + reward_bias) * reward_scale (None: task preset)"""
    reward_bias: float | None = None
    """see reward_scale (None: task preset)"""
    # --- flow policy
    flow_ratio: float = 0.5
    """fraction of each batch with r = t (flow-matching target v; 1 = FM only); MeanFlow's flow_ratio is 1 - this"""
    time_sampler: Literal["logit-normal", "uniform"] = "logit-normal"
    """distribution of the two time draws (t = max, r = min)"""
    time_mu: float = -0.4
    """mean of the logit-normal time draw"""
    time_sigma: float = 1.0
    """std of the logit-normal time draw"""
    time_emb_scale: float = 1.0
    """t and r are multiplied by this before the sinusoidal embedding (DQL fed integer steps)"""
    adaptive_weight: float | None = None
    """MeanFlow's adaptive weight power p, loss / sg(loss + 1e-3)^p (None: preset, 0.5, best on the toy; paper: 0)"""
    hidden_dim: int | None = None
    """width of actor and critic MLPs (None: task preset; DQL and the paper: 256)"""
    critic_layer_norm: bool | None = None
    """LayerNorm after each hidden activation of the critic, as FQL's; DQL's has none (None: task preset)"""
    # --- evaluation
    eval_every: int | None = None
    """gradient steps between evaluations (None: task preset)"""
    eval_episodes: int | None = None
    """episodes per evaluation (None: preset, 10; --preset paper: the paper's 150 per task)"""
    eval_envs: int | None = None
    """environments open at once in an evaluation (None: all its episodes side by side); fewer run the episodes in
    waves: same env seeds, other noise draws, less memory (an OGBench env holds ~170 MB, 50 of them ~8.5 GB)"""
    eval_protocol: Literal["paper", "argmax", "one", "deterministic"] | None = None
    """action selection, filling the four fields below where unset (None: task preset): DQL's sample_action
    (`paper`), the `argmax` of 50 by min target-Q, `one` sample, `deterministic` e = 0 (docs/algorithm.md)"""
    eval_select: Literal["one", "softmax", "argmax"] | None = None
    """`one` sample, or `eval_samples` candidates, one drawn by softmax(Q x temperature) or argmax Q (min target-Q)"""
    eval_samples: int | None = None
    """candidate actions per decision for softmax/argmax (paper: 50)"""
    eval_temperature: float | None = None
    """softmax temperature multiplying Q (DQL: 1; the authors' later code: 100-300 on normalised rewards)"""
    eval_noise_scale: float | None = None
    """std of the evaluation policy's noise (None: the protocol's; 1: the trained N(0, I); 0: e = 0)"""
    log_every: int = 1000
    """gradient steps between TensorBoard scalars (the only host syncs of the loop)"""
    save_every: int | None = None
    """gradient steps between checkpoints (None: at every evaluation)"""
    keep_checkpoints: bool = False
    """also keep each checkpoint as checkpoint_<step>.pt (re-scoring earlier evaluations with eval.py)"""
    divergence_margin: float = 3.0
    """stop when |Q| > margin * max|reward| / (1 - gamma) or a loss is NaN/Inf (checked every log_every steps)"""
    continue_on_divergence: bool = False
    """only log and checkpoint a divergence, do not stop"""

    # The seam: baselines.py's BaselineArgs(Args) overrides these to add --policy flow|diffusion (docs/baselines.md).
    label: ClassVar[str] = "OFQL, one step"  # what trains, in a run's first line and the bandit's plot

    def resolved(self) -> Args:
        """A new Args with every None field filled from the task preset and the eval protocol, values checked."""
        preset = task_preset(self.env, paper=self.preset == "paper")
        args = dataclasses.replace(self, **{key: value for key, value in preset.items() if getattr(self, key) is None})
        select, samples, temperature, noise_scale = EVAL_PROTOCOLS.get(args.eval_protocol, EVAL_PROTOCOLS["paper"])
        if args.eval_select not in (None, select):  # a changed selection: the paper's 50 candidates and noise
            select, (_, samples, _, noise_scale) = args.eval_select, EVAL_PROTOCOLS["paper"]
        samples = 1 if select == "one" else args.eval_samples or samples
        unset = {"save_every": args.eval_every, "eval_temperature": temperature, "eval_noise_scale": noise_scale}
        args = dataclasses.replace(args, eval_select=select, eval_samples=samples,
                                   **{key: value for key, value in unset.items() if getattr(args, key) is None})
        problems = [f"--{key.replace('_', '-')} {getattr(args, key)} must be a finite number in {interval}"
                    for key, interval in RANGES.items()  # None: eval_envs's all at once
                    if getattr(args, key) is not None and not in_range(getattr(args, key), interval)]
        if problems := problems + list(literal_problems(args)):  # a bad --eval-protocol was read as paper above
            raise ValueError("invalid arguments: " + "; ".join(problems))
        return args

    def make_actor(self, obs_dim: int, act_dim: int, device: torch.device) -> nn.Module:
        """OFQL's one-step actor. An actor provides bc_loss(obs, action, args), a differentiable act(obs, noise=None)
        for the Q term and the TD target, and optionally evaluation_act(obs) (default: act)."""
        actor = MeanFlowActor(obs_dim, act_dim, self.hidden_dim, time_scale=self.time_emb_scale).to(device)
        actor.backend, actor.precision = resolve_kernels(self.kernels, device), self.kernel_precision
        return actor


MUJOCO_ETA = 0.1  # OFQL's eta on MuJoCo tasks (mean-reduced BC loss), from the stand-in calibration (docs/calibration.md)
MUJOCO = {"gamma": 0.995, "tau": 0.02, "critic_layer_norm": True}  # OFQL's MuJoCo critic (DQL: 0.99, 0.005, none)
# every preset starts from DQL's main.py defaults but OFQL's eta, lr decay and action selection (docs/algorithm.md)
DEFAULTS = {"eta": MUJOCO_ETA, "lr": 3e-4, "critic_lr": 3e-4, "lr_decay": True, "grad_norm": 9.0, "max_q_backup": False,
            "target_q": "min", "reward_scale": 1.0, "reward_bias": 0.0, "total_steps": 1_000_000, "gamma": 0.99,
            "tau": 0.005, "eval_every": 10_000, "hidden_dim": 256, "critic_layer_norm": False, "normalize_obs": True,
            "eval_protocol": "deterministic", "adaptive_weight": 0.5, "eval_episodes": 10, "normalize_q": True}
# --preset paper: DQL's critic and sample_action, constant lr (DQL's decay is a no-op bug), raw obs, no adaptive weight
PAPER = {"gamma": 0.99, "tau": 0.005, "critic_layer_norm": False, "eval_protocol": "paper", "lr_decay": False,
         "normalize_obs": False, "adaptive_weight": 0.0, "eval_episodes": 150}
# numeric flags and the interval each must lie in (NaN and Inf never do)
RANGES = {"eta": "[0, inf)", "lr": "(0, inf)", "critic_lr": "(0, inf)", "gamma": "(0, 1)", "tau": "(0, 1]",
          "grad_norm": "(-inf, inf)", "reward_scale": "(-inf, inf)", "reward_bias": "(-inf, inf)", "flow_ratio": "[0, 1]",
          "time_mu": "(-inf, inf)", "time_sigma": "(0, inf)", "time_emb_scale": "(0, inf)", "adaptive_weight": "[0, inf)",
          "target_noise_scale": "[0, inf)", "eval_noise_scale": "[0, inf)", "eval_temperature": "(0, inf)",
          "ema_decay": "[0, 1]", "divergence_margin": "(0, inf)", **dict.fromkeys((
              "batch_size", "total_steps", "eval_samples", "eval_episodes", "eval_every", "save_every", "log_every",
              "max_q_samples", "ema_every", "eval_envs"), "[1, inf)")}
# --eval-protocol -> (eval_select, eval_samples, eval_temperature, eval_noise_scale)
EVAL_PROTOCOLS = {"paper": ("softmax", 50, 1.0, 1.0), "argmax": ("argmax", 50, 1.0, 1.0), "one": ("one", 1, 1.0, 1.0),
                  "deterministic": ("one", 1, 1.0, 0.0)}
TRANSITIONS = ("obs", "action", "reward", "next_obs", "mask", "episode_end")  # train(data=...)'s; the last optional
CHECKPOINT_FORMAT = "ofql-checkpoint-v2"  # v1 pickled numpy/python objects; v2 holds tensors and plain values only
# options of older versions: the value this version trains as (such files open), and the fix for any other value
DROPPED_OPTIONS = {"mujoco_data": ("d4rl", "retrain with --env mujoco/<env>/<level>-v0"),  # D4RL names on Minari data
                   "q_scale_running_max": (False, "retrain without it (it is in git show e27f178:ofql.py)")}


def data_module(env: str, required: bool = False):
    """The data module of a task name (docs/data.md), ogbench_tasks.py for `ogbench/` names, else ofql_data.py: imported
    here only, so ofql.py copied alone trains on in-memory data. Absent: None, or a ValueError where `required`."""
    try:
        if env.startswith("ogbench/"):
            import ogbench_tasks as module  # the optional ogbench package is imported inside its loader
        else:
            import ofql_data as module
    except ModuleNotFoundError as err:
        if err.name not in ("ogbench_tasks", "ofql_data"):
            raise
        if required:
            raise ValueError(f"--env {env} loads through {err.name}.py, which is not next to ofql.py: copy it there "
                             "(docs/data.md), or train on your own arrays with ofql.train(args, data=...)") from None
        return None
    return module


def task_preset(env: str, paper: bool = False) -> dict:
    """DEFAULTS, then the family settings and DQL's row of the task from its data module (`mujoco`, your own data's and
    other Minari data's: MUJOCO and argmax selection under DQL's row); paper: PAPER and DQL's MuJoCo eta (1) over it."""
    family, settings = module.task_settings(env) if (module := data_module(env)) else ("mujoco", {})
    if paper and family not in ("mujoco", "antmaze", "kitchen"):
        raise ValueError(f"invalid arguments: --preset paper is for D4RL's MuJoCo, AntMaze and Kitchen tasks and other "
                         f"Minari data (the paper's); {env} is a {family} task: drop --preset paper")
    mujoco = {"eval_protocol": "argmax", **MUJOCO} if family == "mujoco" else {}
    return DEFAULTS | mujoco | settings | (PAPER | ({"eta": 1.0} if family == "mujoco" else {}) if paper else {})


def in_range(value: float, interval: str) -> bool:
    """Whether value is finite and in an interval written as in RANGES."""
    low, high = (float(bound) for bound in interval[1:-1].split(", "))
    return math.isfinite(value) and (low <= value if interval[0] == "[" else low < value) and (
        value <= high if interval[-1] == "]" else value < high)


def literal_problems(args) -> Iterator[str]:
    """A problem for each Literal field of args (a subclass's too) its type hint does not allow; tyro checks only a CLI's."""
    for key, hint in get_type_hints(type(args)).items():
        parts = (hint,) if get_origin(hint) is Literal else get_args(hint)  # Literal[...] or `| None` (None allowed)
        choices = [choice for part in parts if get_origin(part) is Literal for choice in get_args(part)]
        if choices and (value := getattr(args, key)) not in choices and not (value is None and type(None) in parts):
            yield f"--{key.replace('_', '-')} {value!r} must be one of {', '.join(map(str, choices))}"


@dataclasses.dataclass
class Task:
    """What training and evaluation need to know about a task besides its transitions."""

    name: str
    obs_dim: int
    act_dim: int
    make_env: Callable[..., gym.Env] | None  # kwargs go to gym.make; an env with actions in [-1, 1]; None: no env
    ref_min: float
    ref_max: float
    ref_source: str  # where the normalisation constants came from
    score_key: str | None = None  # info entry scored at an episode's end (OGBench: success); None: the return
    plot_samples: Callable[[np.ndarray, str, Path], None] | None = None


def load_task(env_name: str, with_data: bool = True, d4rl_mirror: str | None = None) -> tuple[Task, dict | None]:
    """Task and checked transitions (check_data) of a task name from its data module; with_data=False: the task only."""
    fields, data = data_module(env_name, required=True).load_task(env_name, with_data, d4rl_mirror)
    return Task(env_name, **fields), None if data is None else check_data(data)


# ---- Networks ------------------------------------------------------------------------------
def plain_mish_and_slope(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mish(x) with its graph, and mish'(x) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2) without (sp = softplus(x))."""
    with torch.no_grad():
        tanh_sp = torch.tanh(F.softplus(x))
        slope = tanh_sp + x * torch.sigmoid(x) * (1 - tanh_sp * tanh_sp)
    return F.mish(x), slope


# kernels.py's Mish computes value and slope from one sigmoid, reused by backward and JVP (~3x faster on a CPU)
mish, mish_and_slope = (kernels.mish, kernels.mish_and_slope) if kernels else (F.mish, plain_mish_and_slope)


class MishLayer(nn.Module):
    def forward(self, x):
        return mish(x)


def mlp_with_tangent(layers: nn.Sequential, x: torch.Tensor, tangent: torch.Tensor):
    """Forward an MLP of Linear/Mish layers and push a tangent through it (dual numbers). The primal keeps its
    autograd graph; the tangent, which only feeds a stop-gradient target, is computed without one."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = layer(x)
            with torch.no_grad():
                tangent = tangent @ layer.weight.T
        else:  # Mish: its slope at the primal carries the tangent
            x, slope = mish_and_slope(x)
            with torch.no_grad():
                tangent = slope * tangent
    return x, tangent


def mlp(sizes: list[int]) -> nn.Sequential:
    layers = [layer for n_in, n_out in zip(sizes, sizes[1:]) for layer in (nn.Linear(n_in, n_out), MishLayer())]
    return nn.Sequential(*layers[:-1])


class TimeEmbedding(nn.Module):
    """DQL's SinusoidalPosEmb(16) -> Linear(16, 32) -> Mish -> Linear(32, 16)."""

    def __init__(self, dim: int = 16, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", scale * torch.exp(-math.log(10000) / (dim // 2 - 1) * torch.arange(dim // 2)))
        self.mlp = mlp([dim, 2 * dim, dim])

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        arg = time[:, None] * self.freqs
        return self.mlp(torch.cat([arg.sin(), arg.cos()], -1))

    def forward_with_tangent(self, time: torch.Tensor):
        """Embedding and its derivative with respect to time (tangent 1)."""
        sin, cos = (arg := time[:, None] * self.freqs).sin(), arg.cos()
        return mlp_with_tangent(self.mlp, torch.cat([sin, cos], -1), torch.cat([cos, -sin], -1) * self.freqs.repeat(2))


def resolve_kernels(requested: str, device: torch.device) -> str:
    """"triton" or "torch" for --kernels (see Args.kernels); asking for triton where it cannot run is an error."""
    if kernels is None and requested == "triton":
        raise ValueError(f"--kernels triton needs kernels.py next to ofql.py and the triton package "
                         f"({KERNELS_IMPORT_ERROR}); use --kernels auto or torch")
    return kernels.resolve_backend(requested, device) if kernels else "torch"


class MeanFlowActor(nn.Module):
    """u(z, r, t; s): cat[z, emb(r), emb(t), s] -> 3 x 256 Mish MLP -> average velocity."""

    backend = "torch"  # "triton": u + du/dt and no-grad actions from kernels.py (set by Args.make_actor, --kernels)
    precision = "auto"  # the kernels' --kernel-precision (set with backend)

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, time_dim: int = 16, time_scale: float = 1.0):
        super().__init__()
        self.act_dim = act_dim
        self.emb_r, self.emb_t = TimeEmbedding(time_dim, time_scale), TimeEmbedding(time_dim, time_scale)
        self.net = mlp([act_dim + 2 * time_dim + obs_dim, hidden, hidden, hidden, act_dim])

    def forward(self, z, r, t, obs):
        return self.net(torch.cat([z, self.emb_r(r), self.emb_t(t), obs], -1))

    def velocity_and_dudt(self, z, r, t, obs, v):
        """u(z, r, t) with its graph, and du/dt = v . d_z u + d_t u (JVP, tangents (v, 0, 1) for (z, r, t)) without."""
        if self.backend == "triton":  # one fused launch for u and du/dt; u's backward is torch over saved activations
            return kernels.velocity_and_dudt(kernels.actor_weights(self), z, r, t, obs, v)
        (emb_t, demb_t), emb_r = self.emb_t.forward_with_tangent(t), self.emb_r(r)
        x = torch.cat([z, emb_r, emb_t, obs], -1)
        tangent = torch.cat([v, torch.zeros_like(emb_r), demb_t, torch.zeros_like(obs)], -1)  # v, demb_t: no grad
        return mlp_with_tangent(self.net, x, tangent)

    def bc_loss(self, obs, action, args: Args) -> torch.Tensor:
        """The BC term of OFQL.actor_loss (see Args.make_actor for what an actor provides)."""
        return meanflow_bc_loss(self, obs, action, args)

    def act(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One-step policy a = clip(e - u(e, 0, 1; s), -1, 1)."""
        noise = torch.randn(obs.shape[0], self.act_dim, device=obs.device) if noise is None else noise
        if self.backend == "triton" and not torch.is_grad_enabled():  # TD target and evaluation: the act kernel
            return kernels.act(kernels.actor_weights(self), obs, noise)
        emb = self.one_step_times(obs.device).expand(obs.shape[0], -1)
        return (noise - self.net(torch.cat([noise, emb, obs], -1))).clamp(-1.0, 1.0)

    def one_step_times(self, device) -> torch.Tensor:
        """[emb(r = 0), emb(t = 1)] [1, 2 * time_dim]: the time input of every one-step action."""
        return torch.cat([self.emb_r(torch.zeros(1, device=device)), self.emb_t(torch.ones(1, device=device))], -1)


class EnsembleLinear(nn.Module):
    """`n` independent Linear layers applied as one batched matmul: x [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine per ensemble member: x [n, B, d]."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n, 1, dim)), nn.Parameter(torch.zeros(n, 1, dim))

    def forward(self, x):
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


class TwinCritic(nn.Module):
    """Two Q heads (3 x 256 Mish MLPs over [s, a], optional LayerNorm after each hidden activation) as one; [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layer_norm: bool = False):
        super().__init__()
        dims, layers = [obs_dim + act_dim, hidden, hidden, hidden], []
        for n_in, n_out in zip(dims, dims[1:]):
            layers += [EnsembleLinear(2, n_in, n_out), MishLayer()] + ([EnsembleLayerNorm(2, n_out)] if layer_norm else [])
        self.net = nn.Sequential(*layers, EnsembleLinear(2, hidden, 1))

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], -1).expand(2, -1, -1)).squeeze(-1)


# ---- Losses --------------------------------------------------------------------------------
def draw_times(shape: tuple[int, ...], args: Args, device, generator=None) -> torch.Tensor:
    """Independent times in (0, 1) from --time-sampler."""
    if args.time_sampler == "logit-normal":
        return torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(shape, device=device, generator=generator))
    return torch.rand(shape, device=device, generator=generator)


def sample_times(n: int, args: Args, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) with r <= t: t = max and r = min of two draws; the first round(flow_ratio * n) rows get
    r = t (rows of a batch are i.i.d., so this is a random subset of exactly that size)."""
    draws = draw_times((2, n), args, device, generator)
    t, r, n_equal = draws.max(0).values, draws.min(0).values, round(args.flow_ratio * n)
    return torch.cat([t[:n_equal], r[n_equal:]]), t


def meanflow_bc_loss(actor: MeanFlowActor, obs, action, args: Args, generator=None) -> torch.Tensor:
    """|| u(z_t, r, t; s) - sg(v - (t - r) du/dt) ||^2 averaged over batch and action dims."""
    noise = torch.randn(action.shape, device=action.device, generator=generator)
    r, t = sample_times(len(action), args, action.device, generator)
    z, v = (1 - t[:, None]) * action + t[:, None] * noise, noise - action  # z_t and the velocity e - a
    u, dudt = actor.velocity_and_dudt(z, r, t, obs, v)
    target = v - (t - r)[:, None] * dudt
    err = (u - target.detach()).pow(2).mean(-1)  # mean over action dims as DQL/MeanFlow: eta is the paper's scale
    if args.adaptive_weight > 0:  # MeanFlow's robust weighting: err / sg(err + c)^p
        err = err / (err.detach() + 1e-3) ** args.adaptive_weight
    return err.mean()


def td_target(actor, critic_target, batch, args: Args) -> torch.Tensor:
    """r + gamma * mask * min_i Q'_i(s', a') (mean_i with --target-q mean), a' from the (EMA) one-step policy (noise
    std --target-noise-scale); with max-Q backup, max over `max_q_samples` next actions per head before the min/mean."""
    with torch.no_grad():
        next_obs = batch["next_obs"].repeat_interleave(args.max_q_samples, 0) if args.max_q_backup else batch["next_obs"]
        noise = args.target_noise_scale * torch.randn(len(next_obs), actor.act_dim, device=next_obs.device)
        q_next = critic_target(next_obs, actor.act(next_obs, noise))
        if args.max_q_backup:
            q_next = q_next.view(2, -1, args.max_q_samples).max(-1).values
        return batch["reward"] + args.gamma * batch["mask"] * (q_next.mean(0) if args.target_q == "mean" else q_next.amin(0))


# ---- Agent: networks, optimisers and one gradient step -------------------------------------
# --compile leaves fused Adam (one kernel) eager: compiled, each new lr recompiled it
optimizer_step = torch.compiler.disable(lambda opt: opt.step())


class OFQL:
    def __init__(self, task: Task, args: Args, device: torch.device):
        self.args = args
        self.actor = args.make_actor(task.obs_dim, task.act_dim, device)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False) if args.ema_actor or args.eval_ema else self.actor
        self.actor_target = self.actor_ema if args.ema_actor else self.actor  # next actions of the TD target
        evaluated = self.actor_ema if args.eval_ema else self.actor
        self.evaluation_act = getattr(evaluated, "evaluation_act", evaluated.act)  # what evaluation samples
        self.critic = TwinCritic(task.obs_dim, task.act_dim, args.hidden_dim, args.critic_layer_norm).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.actor_sched, self.critic_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.total_steps)
                                               for opt in (self.actor_opt, self.critic_opt))
        self.step = 0
        # --compile: step count, lr schedules and EMA stay outside, as Python state (docs/flags.md#--compile)
        self.gradient_step = torch.compile(self.eager_gradient_step, dynamic=False, mode="reduce-overhead" if
                                           device.type == "cuda" else None) if args.compile else self.eager_gradient_step

    def critic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """TD error of both heads against td_target's r + gamma * mask * min_i (or mean_i) Q'_i(s', a')."""
        target = td_target(self.actor_target, self.critic_target, batch, self.args)
        q = self.critic(batch["obs"], batch["action"])
        loss = (q - target).pow(2).mean(1).sum()
        return loss, {"losses/critic_loss": loss.detach(), "charts/q_mean": q.detach().mean(),
                      "charts/target_q_mean": target.mean()}

    def actor_loss(self, batch: dict[str, torch.Tensor], swap_heads: bool) -> tuple[torch.Tensor, dict]:
        """L_BC - eta Q_i(s, a_pi) / sg(E|Q_j(s, a_pi)|) (raw Q_i if not normalize_q), (i, j) = (1, 0) if swap_heads."""
        bc_loss = self.actor.bc_loss(batch["obs"], batch["action"], self.args)
        q_loss = torch.zeros((), device=bc_loss.device)
        if self.args.eta > 0:
            self.critic.requires_grad_(False)  # frozen: only the actor gets the Q gradient
            q_pi = self.critic(batch["obs"], self.actor.act(batch["obs"]))
            self.critic.requires_grad_(True)
            q_main, q_norm = (q_pi[1], q_pi[0]) if swap_heads else (q_pi[0], q_pi[1])
            q_loss = -q_main.mean() / (q_norm.abs().mean().detach() if self.args.normalize_q else 1.0)
        loss = bc_loss + self.args.eta * q_loss
        return loss, {"losses/bc_loss": bc_loss.detach(), "losses/q_loss": q_loss.detach(),
                      "losses/actor_loss": loss.detach()}

    def optimise(self, loss: torch.Tensor, net: nn.Module, opt: torch.optim.Optimizer):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_norm > 0:
            nn.utils.clip_grad_norm_(net.parameters(), self.args.grad_norm)
        optimizer_step(opt)

    def eager_gradient_step(self, batch: dict[str, torch.Tensor], swap_heads: bool) -> dict[str, torch.Tensor]:
        """Critic then actor (DQL order), then the critic target; what --compile compiles."""
        critic_loss, critic_metrics = self.critic_loss(batch)
        self.optimise(critic_loss, self.critic, self.critic_opt)
        actor_loss, actor_metrics = self.actor_loss(batch, swap_heads)
        self.optimise(actor_loss, self.actor, self.actor_opt)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.args.tau)
        return critic_metrics | actor_metrics

    def update(self, batch: dict[str, torch.Tensor], swap_heads: bool) -> dict[str, torch.Tensor]:
        """One gradient step, the lr schedules, the EMA actor; detached metrics (no host sync)."""
        metrics = self.gradient_step(batch, swap_heads)
        for sched in (self.actor_sched, self.critic_sched) if self.args.lr_decay else ():
            sched.step()
        self.step += 1
        with torch.no_grad():
            if self.actor_ema is not self.actor and self.step % self.args.ema_every == 0:
                decay = self.args.ema_decay if self.step >= self.args.ema_start else 0.0
                torch._foreach_lerp_(list(self.actor_ema.parameters()), list(self.actor.parameters()), 1 - decay)
        return metrics

    # what a checkpoint holds, with the step: file key -> attribute ("actor_target": the EMA copy, else the actor)
    STATE = {key: key for key in ("actor", "actor_target", "critic", "critic_target", "actor_opt", "critic_opt",
                                  "actor_sched", "critic_sched")} | {"actor_target": "actor_ema"}

    def state_dict(self) -> dict:
        return {key: getattr(self, attr).state_dict() for key, attr in self.STATE.items()} | {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]
        for key, attr in self.STATE.items():
            if attr == "actor_ema" and self.actor_ema is self.actor:
                continue  # this agent keeps no EMA copy: the file's (EMA or actor) must not overwrite the actor
            try:
                getattr(self, attr).load_state_dict(state[key])
            except (RuntimeError, ValueError, KeyError) as err:  # shapes from another task or width
                raise ValueError(f"checkpoint does not fit this task/network ({key}): it was trained with other "
                                 f"observation/action sizes or --hidden-dim. {str(err).splitlines()[0]}") from err


# ---- Acting and evaluation -----------------------------------------------------------------
class Normalizer:
    """Observation standardisation; its statistics travel with every checkpoint."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @classmethod
    def fit(cls, obs: np.ndarray, enabled: bool) -> "Normalizer":
        return cls(obs.mean(0), obs.std(0) + 1e-3) if enabled else cls(np.zeros(obs.shape[1]), np.ones(obs.shape[1]))

    def __call__(self, obs):
        return (obs - self.mean) / self.std


@torch.no_grad()
def sample_actions(agent: OFQL, obs: torch.Tensor, args: Args) -> torch.Tensor:
    """Actions for normalised observations by --eval-select: one sample, or `eval_samples` candidates scored by the min
    target critic, one drawn by softmax(Q x temperature) (DQL's sample_action) or the argmax (--eval-noise-scale)."""
    n = 1 if args.eval_select == "one" else args.eval_samples
    repeated = obs.repeat_interleave(n, 0)
    scale = args.eval_noise_scale  # at 1 the policy draws its own noise: any evaluation_act(obs) fits
    actions = agent.evaluation_act(repeated) if scale == 1.0 else agent.evaluation_act(
        repeated, scale * torch.randn(len(repeated), agent.actor.act_dim, device=obs.device))
    if args.eval_select == "one":
        return actions
    q = agent.critic_target(repeated, actions).min(0).values.view(-1, n)
    softmax = args.eval_select == "softmax"
    choice = torch.multinomial(torch.softmax(q * args.eval_temperature, 1), 1)[:, 0] if softmax else q.argmax(1)
    return actions[choice + torch.arange(len(obs), device=obs.device) * n]


def evaluate(agent: OFQL, task: Task, normalizer: Normalizer, args: Args, episodes: int, seed: int, step: int = 0) -> dict:
    """Normalized score x 100 of the return (or of info[task.score_key] at the end: OGBench's success) over `episodes`
    episodes side by side (--eval-envs at a time), one batched policy call per step, in envs made in episode order
    (eval.py records the first). Env seeds and noise from SeedSequence([seed, step]) (training: step >= 1; eval.py: 0);
    global RNGs untouched."""
    device = next(agent.actor.parameters()).device
    env_seeds = np.random.SeedSequence([seed, step]).generate_state(episodes + 1, np.uint64).tolist()
    returns, final, at_once = np.zeros(episodes), np.zeros(episodes), args.eval_envs or episodes
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(env_seeds.pop())  # evaluation's own draws: its protocol and frequency cannot change training
        agent.actor.eval()
        for wave in (range(first, min(first + at_once, episodes)) for first in range(0, episodes, at_once)):
            envs = [task.make_env() for _ in wave]
            obs = np.stack([env.reset(seed=env_seeds[i])[0] for env, i in zip(envs, wave)])
            alive = np.ones(len(wave), bool)
            while alive.any():
                idx = np.flatnonzero(alive)
                obs_t = torch.as_tensor(normalizer(obs[idx]), dtype=torch.float32, device=device)
                for j, action in zip(idx, sample_actions(agent, obs_t, args).cpu().numpy()):
                    obs[j], reward, term, trunc, info = envs[j].step(action)
                    returns[wave[j]] += reward
                    final[wave[j]] = info[task.score_key] if task.score_key else 0.0
                    alive[j] = not (term or trunc)
            for env in envs:
                env.close()
        agent.actor.train()
    scores = 100 * ((final if task.score_key else returns) - task.ref_min) / (task.ref_max - task.ref_min)
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()), "score_mean": float(scores.mean()),
            "score_std": float(scores.std()), "ref_source": task.ref_source, "scores": scores.tolist()}


# ---- Checkpoints ---------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> dict:
    """Every RNG's state as tensors and plain values (numpy: (name, keys, pos, has_gauss, cached_gaussian))."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "sampler": generator.get_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict, generator: torch.Generator):
    """Restore what `rng_state` returned."""
    name, keys, pos, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["sampler"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(path: Path, agent: OFQL, args: Args, normalizer: Normalizer, generator: torch.Generator,
                    history: list[dict]):
    """Everything a resume needs as tensors and plain values (no pickled code), written to a temp file then renamed."""
    state = {"format": CHECKPOINT_FORMAT, "args": dataclasses.asdict(args), "agent": agent.state_dict(),
             "obs_mean": torch.from_numpy(normalizer.mean), "obs_std": torch.from_numpy(normalizer.std),
             "history": history, "rng": rng_state(generator)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` with torch.load(weights_only=True): a shared file
    cannot run code when opened. Clear errors for old (v1), hostile, corrupt or foreign files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # missing, a folder, no permission
        raise ValueError(f"cannot read the checkpoint {path} ({err.strerror or err}): give --resume (eval.py: "
                         "--checkpoint) an existing, readable file, runs/<run>/checkpoint.pt") from err
    except Exception as err:
        try:  # the functions/classes the pickle would import, read without unpickling it
            needs = ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
        except Exception:  # not a torch.save zip file
            needs = ""
        unsafe = (f"{path} is not a safe OFQL checkpoint: it holds pickled objects ({needs}) whose loading could run "
                  f"arbitrary code, so it was not opened. This version opens {CHECKPOINT_FORMAT} files only; a file of "
                  "an older ofql.py (v1, numpy objects) needs the ofql.py that wrote it, or a retrain")
        corrupt = f"{path} is unreadable (truncated or corrupt: {type(err).__name__}); use another checkpoint of the run"
        raise ValueError(unsafe if needs else corrupt) from err  # a v1 file is unsafe (numpy objects)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an OFQL checkpoint (written by ofql.py save_checkpoint)")
    for option, (kept, fix) in DROPPED_OPTIONS.items():
        if (value := state["args"].pop(option, kept)) != kept:
            raise ValueError(f"{path} was trained with --{option.replace('_', '-')} {value}, which this version "
                             f"dropped: use the ofql.py that wrote it, or {fix}")
    return state


# ---- Training ------------------------------------------------------------------------------
def check_data(data: dict) -> dict[str, np.ndarray]:
    """train(data=...)'s transitions, one row each: obs and next_obs [N, obs_dim], action [N, act_dim] in [-1, 1],
    reward and mask [N] (mask = 1 - terminal: a time limit is no terminal), optionally episode_end [N] (1 on an
    episode's last transition: every mask 0 must be one). Float arrays back (episode_end checked, then dropped), or
    a ValueError that names the first bad array and its fix."""
    if not isinstance(data, dict) or not set(TRANSITIONS[:5]) <= set(data) <= set(TRANSITIONS):
        raise ValueError(f"data must be a dict of the arrays {', '.join(TRANSITIONS[:5])} and optionally episode_end, "
                         f"one row per transition (got {sorted(data) if isinstance(data, dict) else type(data)})")
    arrays = {}
    for key in [key for key in TRANSITIONS if key in data]:
        value, ndim = np.asarray(data[key]), 2 if key in ("obs", "action", "next_obs") else 1
        if value.dtype.kind not in "biuf" or value.ndim != ndim:  # bool, int, float
            problem = f"is {value.dtype} of shape {value.shape}"
            fix = "give numbers of shape " + ("[N, dims] (one dim: x.reshape(-1, 1))" if ndim == 2 else "[N]")
        elif arrays and len(value) != len(arrays["obs"]):
            problem, fix = f"has {len(value)} rows, data['obs'] {len(arrays['obs'])}", "give one row per transition"
        elif (bad := ~np.isfinite(value)).any():
            problem, fix = f"holds NaN/Inf (first in row {np.argwhere(bad)[0, 0]})", "drop or fix those transitions"
        elif key == "next_obs" and value.shape != arrays["obs"].shape:
            problem, fix = f"has shape {value.shape}, data['obs'] {arrays['obs'].shape}", "give each next observation"
        elif key == "action" and value.size and np.abs(value).max() > 1:
            problem = f"is outside [-1, 1] ({value.min():.3g} to {value.max():.3g})"
            fix = ("rescale it, 2 (a - low) / (high - low) - 1, and evaluate in an env wrapped in "
                   "gymnasium.wrappers.RescaleAction(env, -1, 1)")
        elif key == "mask" and ((value < 0) | (value > 1)).any():
            problem, fix = "is outside [0, 1]", "give mask = 1 - terminal (0 where the episode terminated)"
        elif key == "episode_end" and ((arrays["mask"] == 0) & (value == 0)).any():
            problem = "is 0 where data['mask'] is 0 (a terminal ends its episode)"
            fix = "give mask = 1 - terminal (1 where the episode goes on), not the terminal flag itself"
        else:
            arrays[key] = value if value.dtype.kind == "f" else value.astype(np.float64)
            continue
        raise ValueError(f"invalid data for ofql.train: data['{key}'] {problem}: {fix} (docs/own_data.md)")
    arrays.pop("episode_end", None)
    return arrays


def own_task(name: str, data: dict, make_env: Callable[..., gym.Env] | None,
             ref_scores: tuple[float, float] | None) -> tuple[Task, dict[str, np.ndarray]]:
    """The Task of train(data=...)'s transitions (checked), its evaluation env checked against them."""
    if (module := data_module(name)) and module.task_settings(name) != ("mujoco", {}):  # a family's or DQL's preset
        raise ValueError(f"args.env '{name}' names a task of this project, whose preset and evaluation would apply to "
                         "your data: give your task a name of its own, e.g. Args(env='my-robot')")
    data = check_data(data)
    task = Task(name, data["obs"].shape[1], data["action"].shape[1], make_env, *(ref_scores or (0.0, 1.0)),
                f"ref_scores {ref_scores} given to ofql.train" if ref_scores else "none (score = 100 x raw return)")
    if make_env is not None:  # a mismatch fails now, not at the first evaluation
        with make_env() as env:  # closed at once: only its spaces are checked
            space, shape = env.action_space, env.observation_space.shape
        if shape != (task.obs_dim,) or not (isinstance(space, gym.spaces.Box) and space.shape == (task.act_dim,)
                                            and (space.low == -1).all() and (space.high == 1).all()):
            raise ValueError(f"make_env() gives observations of shape {shape} and actions {space}, the data obs_dim "
                             f"{task.obs_dim} and actions in [-1, 1]^{task.act_dim}: wrap the env in "
                             "gymnasium.wrappers.RescaleAction(env, -1, 1)")
    return task, data


class ReplayBuffer:
    """All transitions as tensors on the training device; sampling never leaves the device."""

    def __init__(self, data: dict[str, np.ndarray], device: torch.device, generator: torch.Generator):
        self.data = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}
        self.size, self.generator = len(data["obs"]), generator

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.generator.device, generator=self.generator)
        return {k: v[idx] for k, v in self.data.items()}


class DivergenceError(RuntimeError):
    """Raised when the critic or a loss diverges (see --divergence-margin)."""


def make_run_dir(args: Args) -> Path:
    """A fresh run folder under out_dir (a suffix where the name is taken), or `args.run_dir` if it holds no checkpoint."""
    given = args.run_dir is not None
    base = Path(args.run_dir) if given else Path(args.out_dir) / (
        f"{args.env.strip('/').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if given and (base / "checkpoint.pt").exists():
        raise ValueError(f"{base} already holds a run; continue it with --resume {base / 'checkpoint.pt'} "
                         "or pass another --run-dir")
    for suffix in range(1 if given else 1000):
        run_dir = base.with_name(f"{base.name}_{suffix}") if suffix else base
        try:
            run_dir.mkdir(parents=True, exist_ok=given)
            return run_dir
        except OSError as err:
            if given or not isinstance(err, FileExistsError):  # else another run took this name: the next suffix
                raise ValueError(f"cannot create the run folder {run_dir} ({err.strerror}); pass a writable "
                                 f"{'--run-dir' if given else '--out-dir'}") from err
    raise ValueError(f"too many runs named {base}*; pass another --exp-name")


def check_divergence(values: dict[str, float], q_bound: float) -> str | None:
    """A message when a logged loss is not finite or |Q| left the bound, else None."""
    if bad := [k for k, v in values.items() if not math.isfinite(v)]:
        return f"non-finite {', '.join(bad)}"
    q = max(abs(values["charts/q_mean"]), abs(values["charts/target_q_mean"]))
    return f"|Q| = {q:.3g} exceeds the bound {q_bound:.3g} (margin x max|reward| / (1 - gamma))" if q > q_bound else None


def train(args: Args, data: dict[str, np.ndarray] | None = None, make_env: Callable[..., gym.Env] | None = None,
          ref_scores: tuple[float, float] | None = None) -> dict:
    """Train args' actor (OFQL's, or baselines.py's) on the task args.env names, or on your transitions `data`
    (check_data; docs/own_data.md) with make_env(**kwargs), an env of actions in [-1, 1] (None: no evaluation), and
    ref_scores, the (min, max) return of the normalized score (None: 100 x return). Returns summary.json's dict."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    resumed = load_checkpoint(args.resume) if args.resume else None
    if resumed is not None:  # rebuilt with the class of `args`: baselines.py's BaselineArgs knows its extra fields
        if unknown := set(resumed["args"]) - {f.name for f in dataclasses.fields(args)}:
            raise ValueError(f"{args.resume} has options that {type(args).__name__} lacks ({', '.join(sorted(unknown))}): "
                             f"written by baselines.py or an older ofql.py; continue it with python baselines.py train "
                             f"--resume {args.resume}")
        args = dataclasses.replace(type(args)(**resumed["args"]), resume=args.resume)
    args = args.resolved()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    # seeding: the one place
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    task, data = (load_task(args.env, d4rl_mirror=args.d4rl_mirror) if data is None
                  else own_task(args.env, data, make_env, ref_scores))
    if args.batch_size > len(data["obs"]):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the dataset ({len(data['obs'])} transitions)")
    normalizer = (Normalizer(resumed["obs_mean"].numpy(), resumed["obs_std"].numpy()) if resumed is not None
                  else Normalizer.fit(data["obs"], args.normalize_obs))
    data["obs"], data["next_obs"] = normalizer(data["obs"]), normalizer(data["next_obs"])
    data["reward"] = (data["reward"] + args.reward_bias) * args.reward_scale
    buffer = ReplayBuffer(data, device, generator)
    agent = OFQL(task, args, device)
    if resumed is not None:
        run_dir, history = Path(args.resume).parent, resumed["history"]
        agent.load_state_dict(resumed["agent"])
        set_rng_state(resumed["rng"], generator)
        print(f"resumed {args.resume} at step {agent.step}")
    else:
        run_dir, history = make_run_dir(args), []
    print(f"{args.label} on {args.env}, {args.total_steps} steps; run folder: {run_dir}" + (
        "\n--compile: the first two gradient steps compile (about a minute on a CPU)" if args.compile else ""), flush=True)
    writer = SummaryWriter(str(run_dir))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), name=run_dir.name,
                   sync_tensorboard=True, resume="allow")
    ckpt_path = run_dir / "checkpoint.pt"
    q_bound = args.divergence_margin * max(float(np.abs(data["reward"]).max()), 1e-6) / (1 - args.gamma)
    start, t0, evaluated = agent.step, time.time(), task.make_env is not None
    progress = tqdm(range(agent.step + 1, args.total_steps + 1), initial=agent.step, total=args.total_steps,
                    desc=args.env, unit="step", dynamic_ncols=True, mininterval=1.0)
    for done in progress:  # the step count after this update
        metrics = agent.update(buffer.sample(args.batch_size), swap_heads=random.random() < 0.5)
        if done % args.log_every == 0 or done == args.total_steps:
            values = {k: v.item() for k, v in metrics.items()}
            values["charts/steps_per_second"] = (done - start) / (time.time() - t0)
            for key, value in values.items():
                writer.add_scalar(key, value, done)
            progress.set_postfix(bc=f"{values['losses/bc_loss']:.3f}", q=f"{values['charts/q_mean']:.1f}")
            if (problem := check_divergence(values, q_bound)) is not None:
                save_checkpoint(run_dir / f"diverged_{done}.pt", agent, args, normalizer, generator, history)
                message = (f"divergence at step {done}: {problem}. Diagnostic checkpoint: {run_dir}/diverged_{done}.pt. "
                           "Try a smaller --lr/--eta or a --grad-norm, or --continue-on-divergence to go on.")
                writer.add_text("charts/divergence", message, done)
                progress.write(message)
                if not args.continue_on_divergence:
                    writer.close()
                    raise DivergenceError(message)
        if evaluated and (done % args.eval_every == 0 or done == args.total_steps):
            result = evaluate(agent, task, normalizer, args, args.eval_episodes, args.seed, done)
            history.append({"step": done, **{k: v for k, v in result.items() if k != "scores"}})
            writer.add_scalar("eval/normalized_score", result["score_mean"], done)
            writer.add_scalar("eval/return", result["return_mean"], done)
            progress.write(f"step {done}: normalized score {result['score_mean']:.1f} +- {result['score_std']:.1f} "
                           f"(return {result['return_mean']:.1f}, refs: {result['ref_source']})")
        if done % args.save_every == 0 or done == args.total_steps:
            save_checkpoint(ckpt_path, agent, args, normalizer, generator, history)
            if args.keep_checkpoints:
                (run_dir / f"checkpoint_{done}.pt").write_bytes(ckpt_path.read_bytes())
    progress.close()
    if task.plot_samples is not None:  # the bandit: the evaluation policy's samples next to the data
        with torch.no_grad():
            samples = agent.evaluation_act(torch.zeros(2000, task.obs_dim, device=device)).cpu().numpy()
        task.plot_samples(samples, args.label, run_dir)
    wall, scores = time.time() - t0, [h["score_mean"] for h in history]
    summary = {"env": args.env, "steps": agent.step, "wall_time_s": wall,
               "steps_per_second": (agent.step - start) / max(wall, 1e-9), "final_score": scores[-1] if scores else None,
               "best_score": max(scores) if scores else None, "score_source": task.ref_source, "history": history,
               "run_dir": str(run_dir), "checkpoint": str(ckpt_path), "args": dataclasses.asdict(args)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    writer.close()
    if args.track:
        wandb.finish()
    score = lambda value: "none" if value is None else f"{value:.1f}"  # noqa: E731
    print(f"done: final normalized score {score(summary['final_score'])}, best {score(summary['best_score'])}; "
          f"{summary['steps_per_second']:.1f} steps/s, {wall:.1f} s; summary {run_dir / 'summary.json'}, checkpoint "
          f"{ckpt_path}, TensorBoard {run_dir}; evaluate: python eval.py --checkpoint {ckpt_path}")
    return summary


def main(args: Args):
    """Train from a command line (ofql.py's, baselines.py's): a user error is one line."""
    try:
        train(args)
    except (ValueError, FileNotFoundError, DivergenceError) as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main(tyro.cli(Args))
