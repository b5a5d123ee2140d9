"""Baseline policy classes for the paper's comparisons, trained by ofql.py's loop, and the toy figure.

    python baselines.py train --env hopper-medium-v2 --policy flow --policy-steps 5 --eval-policy-steps 1  # FQL row
    python baselines.py train --env hopper-medium-v2 --policy diffusion --policy-steps 5                   # DQL row
    python baselines.py train --env hopper-medium-v2 --policy diffusion --eval-policy-steps 1              # DQL + DDIM
    python baselines.py toy --png toy.png --json toy.json   # Figure 3: FM with 1/2/5/10 steps vs OFQL with 1

`train` takes every ofql.py flag plus this file's (BaselineArgs: --policy, --policy-steps, --eval-policy-steps)
and runs `ofql.train`, which builds the actor, presets and checks through the BaselineArgs it is given; ofql.py
never imports this file. Everything else (data, critic, TD target, actor loss L_BC - eta Q / E|Q|, loop,
logging, evaluation, checkpoints) is ofql.py's: an actor here only provides `bc_loss(obs, action, args)`, a
differentiable `act(obs, noise=None)` (the K-step sampler used by the Q term and the TD target),
`evaluation_act` (the K'-step sampler of --eval-policy-steps) and `sampler(steps)`, a `policy(obs, noise) ->
action` callable for evaluation and benchmarks.

Both baselines use DQL's network: cat[x, emb(time), s] -> 3 x hidden Mish MLP -> action dim, with
ofql.py's TimeEmbedding (one time input, where OFQL's actor has two). Their BC losses are averaged over
action dimensions and the batch, like OFQL's and DQL's, so --eta means the same for every --policy.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro

import ofql
import ofql_data
from ofql import Args, MeanFlowActor, TimeEmbedding, draw_times, mlp
from ofql_data import BANDIT_STD, bandit_modes, make_bandit_data


class TimeConditionedMLP(nn.Module):
    """f(x, time; s) = MLP(cat[x, emb(time), s]): DQL's noise network, and the flow-matching velocity."""

    eval_steps: int | None = None  # network calls per action at evaluation (--eval-policy-steps; None: as trained)

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, steps: int = 5, time_dim: int = 16,
                 time_scale: float = 1.0):
        super().__init__()
        self.act_dim, self.steps = act_dim, steps
        self.emb = TimeEmbedding(time_dim, time_scale)
        self.net = mlp([act_dim + time_dim + obs_dim, hidden, hidden, hidden, act_dim])

    def forward(self, x, time, obs):
        return self.net(torch.cat([x, self.emb(time), obs], -1))

    def initial_noise(self, obs, noise):
        return torch.randn(obs.shape[0], self.act_dim, device=obs.device) if noise is None else noise

    def evaluation_act(self, obs, noise=None):
        """What ofql.OFQL evaluates: `sampler(eval_steps)`."""
        return self.sampler(self.eval_steps)(obs, noise)


class FlowActor(TimeConditionedMLP):
    """Flow-matching BC: v(z, t; s) regresses the conditional velocity e - a on z_t = (1 - t) a + t e
    (OFQL's time convention, t = 1 is noise, t from --time-sampler); actions by K Euler steps from t = 1
    to 0, differentiable through all K steps (the Q term back-propagates through the chain)."""

    def bc_loss(self, obs, action, args: Args, generator=None) -> torch.Tensor:
        noise = torch.randn(action.shape, device=action.device, generator=generator)
        t = draw_times((len(action),), args, action.device, generator)
        z = (1 - t[:, None]) * action + t[:, None] * noise
        return (self(z, t, obs) - (noise - action)).pow(2).mean()

    def act(self, obs, noise=None, steps: int | None = None):
        steps = steps or self.steps
        z = self.initial_noise(obs, noise)
        for k in range(steps, 0, -1):
            z = z - self(z, torch.full((len(obs),), k / steps, device=obs.device), obs) / steps
        return z.clamp(-1.0, 1.0)

    def sampler(self, steps: int | None = None):
        """policy(obs, noise) with `steps` Euler steps (None: the trained K)."""
        return lambda obs, noise=None: self.act(obs, noise, steps)


def vp_alphas(steps: int) -> torch.Tensor:
    """DQL's variance-preserving schedule (beta_min 0.1, beta_max 10) discretised into `steps` steps:
    alpha_i = exp(-b_min / K - (b_max - b_min) (2 i - 1) / (2 K^2)), i = 1..K, in float64."""
    i = torch.arange(1, steps + 1, dtype=torch.float64)
    b_min, b_max = 0.1, 10.0
    return torch.exp(-b_min / steps - 0.5 * (b_max - b_min) * (2 * i - 1) / steps**2)


class DiffusionActor(TimeConditionedMLP):
    """DQL's DDPM policy: epsilon prediction on x_k = sqrt(abar_k) a + sqrt(1 - abar_k) e, k uniform in
    0..K-1 (the step index is the network's time input, unscaled, as in DQL); actions by the K-step
    ancestral sampler (x0 clipped to [-1, 1], posterior mean + posterior std noise, none at k = 0),
    differentiable through the chain; `sampler(K')` is a deterministic DDIM over K' of the K steps."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, steps: int = 5, time_dim: int = 16):
        super().__init__(obs_dim, act_dim, hidden, steps, time_dim)
        alphas = vp_alphas(steps)
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        schedule = {
            "alpha_bar": alpha_bar,
            "posterior_x0": (1 - alphas) * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_xk": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            "posterior_std": ((1 - alphas) * (1 - alpha_bar_prev) / (1 - alpha_bar)).clamp(min=1e-20).sqrt(),
        }
        for name, value in schedule.items():  # derived from `steps`, so not saved in checkpoints
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0, k, noise):
        """x_k ~ q(x_k | x_0) = N(sqrt(abar_k) x0, (1 - abar_k) I), written with the given noise."""
        abar = self.alpha_bar[k][:, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x, k: int, obs):
        """(x0 estimate clipped to [-1, 1], predicted noise) at step index k."""
        eps = self(x, torch.full((len(obs),), float(k), device=obs.device), obs)
        abar = self.alpha_bar[k]
        return ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0), eps

    def bc_loss(self, obs, action, args: Args, generator=None) -> torch.Tensor:
        noise = torch.randn(action.shape, device=action.device, generator=generator)
        k = torch.randint(0, self.steps, (len(action),), device=action.device, generator=generator)
        return (self(self.q_sample(action, k, noise), k.float(), obs) - noise).pow(2).mean()

    def act(self, obs, noise=None):
        x = self.initial_noise(obs, noise)
        for k in reversed(range(self.steps)):
            x0, _ = self.predict_x0(x, k, obs)
            x = self.posterior_x0[k] * x0 + self.posterior_xk[k] * x
            if k > 0:
                x = x + self.posterior_std[k] * torch.randn_like(x)
        return x.clamp(-1.0, 1.0)

    def ddim(self, obs, noise=None, steps: int = 1):
        """Deterministic DDIM (eta 0) over `steps` evenly spaced indices of the trained K, from K-1 to 0,
        then to the data: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
        x = self.initial_noise(obs, noise)
        ks = torch.linspace(self.steps - 1, 0, steps).round().long().tolist()
        for k, k_prev in zip(ks, ks[1:] + [None]):
            x0, eps = self.predict_x0(x, k, obs)
            if k_prev is None:
                return x0
            abar_prev = self.alpha_bar[k_prev]
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps

    def sampler(self, steps: int | None = None):
        """policy(obs, noise): DQL's K-step DDPM (None) or a `steps`-step DDIM."""
        if steps is None:
            return self.act
        return lambda obs, noise=None: self.ddim(obs, noise, steps)


# ---------------------------------------------------------------------------------------------
# Options: ofql.py's and the policy class, through the seam ofql.Args defines (resolved, make_actor, label)
# ---------------------------------------------------------------------------------------------
def dql_eta(env: str) -> float:
    """DQL's eta for the task, what the comparison rows take: 1.0 on MuJoCo (and OGBench), where OFQL has its own
    measured eta; ofql.py's other presets (AntMaze, Kitchen, built-in tasks) already hold DQL's."""
    return 1.0 if family(env) in ("mujoco", "ogbench") else ofql.task_preset(env)["eta"]


def dql_critic(env: str) -> dict[str, float | bool]:
    """DQL's gamma, tau and critic without LayerNorm (ofql.DEFAULTS) where the task takes OFQL's measured MuJoCo
    ones (ofql.MUJOCO: the D4RL MuJoCo names and any other Minari data); elsewhere none, and the task preset's hold."""
    return {field: ofql.DEFAULTS[field] for field in ofql.MUJOCO} if family(env) == "mujoco" else {}


def family(env: str) -> str:
    """The task family of a name (`mujoco`, `antmaze`, `kitchen`, `bandit`, `pendulum` or `ogbench`), from its data
    module's task_settings."""
    return ofql.data_module(env).task_settings(env)[0]


@dataclass
class BaselineArgs(Args):
    """Every ofql.py option, and the policy class: OFQL's one-step policy or a comparison baseline
    (docs/baselines.md). eval.py and sweep.py read every checkpoint and grid with it."""

    ema_actor: bool | None = None
    """use an EMA copy of the actor for next actions (DQL's); the paper's OFQL uses the current actor
    (None: on for --policy diffusion, as DQL; off otherwise)"""
    policy: Literal["meanflow", "flow", "diffusion"] = "meanflow"
    """`meanflow` = OFQL's one-step average-velocity policy, trained exactly as by ofql.py. Comparison baselines:
    `flow` = flow-matching BC with K Euler steps, back-propagated through in the Q term (FQL row);
    `diffusion` = DQL's DDPM (vp schedule, epsilon prediction, K steps, EMA target actor)"""
    policy_steps: int | None = None
    """K, network calls per action in training (None: 1 for meanflow, 5 for flow and diffusion)"""
    eval_policy_steps: int | None = None
    """network calls per action at evaluation (None: as trained). flow: K' Euler steps; diffusion: a
    deterministic DDIM with K' <= K steps over the trained schedule (1 = the paper's `DQL + DDIM`)"""

    def resolved(self) -> Args:
        """--policy meanflow: a plain ofql.Args, so the run trains, checkpoints and resumes as ofql.py's. flow and
        diffusion: DQL's eta, gamma, tau and plain critic for the task, K = 5, DQL's inference (`paper`) and (diffusion) DQL's EMA
        actor where not given, then ofql.py's presets and checks, then the baselines' own."""
        if self.policy == "meanflow":
            if {self.policy_steps, self.eval_policy_steps} - {1, None}:
                raise ValueError("invalid arguments: --policy meanflow acts in one step: drop --policy-steps/"
                                 "--eval-policy-steps or pick --policy flow/diffusion")
            ofql_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Args)}
            return Args(**ofql_fields | {"ema_actor": bool(self.ema_actor)}).resolved()
        critic = {field: value for field, value in dql_critic(self.env).items() if getattr(self, field) is None}
        args = Args.resolved(dataclasses.replace(
            self, eta=dql_eta(self.env) if self.eta is None else self.eta, **critic,
            policy_steps=5 if self.policy_steps is None else self.policy_steps,
            ema_actor=self.policy == "diffusion" if self.ema_actor is None else self.ema_actor,
            eval_protocol="paper" if self.eval_protocol is None else self.eval_protocol))  # DQL's sample_action
        problems = []
        if args.policy_steps < 1 or (args.eval_policy_steps or 1) < 1:
            problems.append("--policy-steps and --eval-policy-steps must be >= 1")
        if args.policy == "diffusion" and (args.eval_policy_steps or 1) > args.policy_steps:
            problems.append(f"--eval-policy-steps {args.eval_policy_steps} > --policy-steps {args.policy_steps}: DDIM "
                            "strides over the trained schedule, so it can use at most K steps")
        if problems:
            raise ValueError("invalid arguments: " + "; ".join(problems))
        return args

    def make_actor(self, obs_dim: int, act_dim: int, device: torch.device) -> nn.Module:
        if self.policy == "meanflow":
            return super().make_actor(obs_dim, act_dim, device)
        if self.policy == "flow":
            actor = FlowActor(obs_dim, act_dim, self.hidden_dim, self.policy_steps, time_scale=self.time_emb_scale)
        else:
            actor = DiffusionActor(obs_dim, act_dim, self.hidden_dim, self.policy_steps)
        actor.eval_steps = self.eval_policy_steps
        return actor.to(device)

    @property
    def label(self) -> str:  # ofql.Args.label
        return f"--policy {self.policy}"


# ---------------------------------------------------------------------------------------------
# Toy figure (paper Figure 3): BC only on the 2-D eight-mode data
# ---------------------------------------------------------------------------------------------
def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples (V-statistic; 0 for equal
    distributions, larger the further apart)."""
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1).mean()
    return 2 * d(x, y) - d(x, x) - d(y, y)


def mode_coverage(samples: np.ndarray) -> dict[str, float]:
    """Figure 3's measure: the fraction of samples within 2 std (0.1) of a mode centre, and the smallest and
    largest share of those samples that one mode holds (the data: ~86%, every mode ~12.5%; uniform noise ~6%)."""
    centres, _ = bandit_modes()
    dist = np.linalg.norm(samples[:, None] - centres[None], axis=-1)
    near = dist.min(1) < 2 * BANDIT_STD
    share = np.bincount(dist.argmin(1)[near], minlength=len(centres)) / max(int(near.sum()), 1)
    return {"near_mode": float(near.mean()), "min_mode_share": float(share.min()), "max_mode_share": float(share.max())}


def train_toy_bc(policy: str, steps: int, hidden: int = 256, seed: int = 0, lr: float = 1e-3, **overrides) -> nn.Module:
    """BC only (no critic) on the eight-mode actions of `bandit-8modes` with the --policy's own loss, Adam with
    the lr cosine-decayed to 0 over `steps` (ofql.py's --lr-decay); `overrides` are further Args fields (e.g.
    flow_ratio=1.0: MeanFlow trained as plain flow matching)."""
    torch.manual_seed(seed)
    args = BaselineArgs(env="bandit-8modes", policy=policy, hidden_dim=hidden, total_steps=steps,
                        **{"lr_decay": True} | overrides).resolved()
    actions = torch.as_tensor(make_bandit_data(background=0.0, seed=seed)["action"], dtype=torch.float32)
    actor = args.make_actor(1, 2, torch.device("cpu"))
    opt = torch.optim.Adam(actor.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    obs = torch.zeros(args.batch_size, 1)
    for _ in range(steps):
        loss = actor.bc_loss(obs, actions[torch.randint(0, len(actions), (args.batch_size,))], args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.lr_decay:
            sched.step()
    return actor


def toy_samples(flow: FlowActor, meanflow: MeanFlowActor, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The figure's panels: flow matching with 1, 2, 5, 10 Euler steps and OFQL with 1, same noise."""
    torch.manual_seed(seed)
    obs, noise = torch.zeros(n, 1), torch.randn(n, 2)
    with torch.no_grad():
        panels = {f"FM-{k}": flow.sampler(k)(obs, noise) for k in (1, 2, 5, 10)}
        panels["OFQL-1"] = meanflow.act(obs, noise)
    return {k: v.numpy() for k, v in panels.items()}


@dataclass
class ToyConfig:
    """Figure 3: BC only on the 2-D eight-mode data, flow matching with 1/2/5/10 Euler steps vs OFQL with 1."""

    steps: int = 20_000
    """BC gradient steps of each model (batch 256, Adam lr 1e-3 cosine-decayed to 0)"""
    hidden: int = 256
    """MLP width of both models"""
    samples: int = 4000
    """samples per panel, and held-out data points the energy distance compares them with"""
    seed: int = 0
    threads: int = 1
    """torch CPU threads"""
    png: str = "toy_figure.png"
    """where the figure is written"""
    json: str | None = None
    """write the measures (and the config) to this JSON file"""


def toy_figure(cfg: ToyConfig) -> dict:
    """Train flow matching and OFQL on the 2-D eight-mode data, plot their samples beside the data and
    print each panel's mode coverage and energy distance to held-out data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(cfg.threads)
    start = time.time()
    flow = train_toy_bc("flow", cfg.steps, cfg.hidden, cfg.seed)
    meanflow = train_toy_bc("meanflow", cfg.steps, cfg.hidden, cfg.seed)
    data = make_bandit_data(cfg.samples, seed=cfg.seed + 1, background=0.0)["action"]
    uniform = np.random.default_rng(cfg.seed).uniform(-1, 1, (cfg.samples, 2))
    panels = {"data": data, **toy_samples(flow, meanflow, cfg.samples, cfg.seed)}
    measures = {name: mode_coverage(x) | {"energy_distance": energy_distance(x, data)}
                for name, x in {**panels, "uniform": uniform}.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, panels.items()):
        m = measures[name]
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(f"{name}\n{100 * m['near_mode']:.0f}% on a mode, {100 * m['min_mode_share']:.0f}-"
                     f"{100 * m['max_mode_share']:.0f}% per mode", fontsize=9)
        ax.set_xlim(-1.05, 1.05), ax.set_ylim(-1.05, 1.05), ax.set_aspect("equal")
    fig.savefig(cfg.png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"\n{cfg.steps} BC steps per model, {cfg.samples} samples per panel, {time.time() - start:.0f} s; "
          "'on a mode' = within 2 std (0.1) of a mode centre; shares are of those samples")
    print("| panel | on a mode | smallest / largest mode share | energy distance to held-out data |\n|---|---|---|---|")
    for name, m in measures.items():
        print(f"| {name} | {100 * m['near_mode']:.1f}% | {100 * m['min_mode_share']:.1f}% / "
              f"{100 * m['max_mode_share']:.1f}% | {m['energy_distance']:.4f} |")
    result = {"config": dataclasses.asdict(cfg), "measures": measures}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    description = "Train a --policy through ofql.py's loop (every ofql.py flag), or draw the toy figure."
    config = tyro.extras.subcommand_cli_from_dict({"train": BaselineArgs, "toy": ToyConfig}, description=description)
    if isinstance(config, ToyConfig):
        toy_figure(config)
    else:
        ofql.main(config)
