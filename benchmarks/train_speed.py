"""Training speed of one OFQL gradient step (critic + actor), side by side with eager baselines.

    python benchmarks/train_speed.py --threads 1 --batch-size 256 --json out.json

Variants, all the same networks and losses (hopper shapes: obs 11, action 3, hidden 256):
  ofql            ofql.py as shipped: dual-number JVP (tangent without autograd graph), one-sigmoid Mish
  func.jvp        the target from `torch.func.jvp` (primal with graph taken from the JVP call)
  func.jvp+aten   as func.jvp, with aten's `mish` (the plain eager prototype)
Rounds interleave the variants so machine noise hits all of them alike; the table shows medians.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ofql  # noqa: E402


@dataclass
class Config:
    threads: int = 1
    """torch CPU threads"""
    batch_size: int = 256
    """transitions per step"""
    steps: int = 50
    """gradient steps per timed round"""
    rounds: int = 5
    """timed rounds per variant (interleaved)"""
    json: str | None = None
    """write the results to this JSON file"""


HOPPER_SHAPES = ofql.Task("bench", 11, 3, None, 0.0, 1.0, "")  # obs 11, action 3


def random_hopper_buffer(n: int = 100_000) -> ofql.ReplayBuffer:
    """Random transitions of hopper's shapes: timing needs the shapes, not the data."""
    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(size=(n, 11)), "action": rng.uniform(-1, 1, (n, 3)), "reward": rng.normal(size=n),
            "next_obs": rng.normal(size=(n, 11)), "mask": np.ones(n)}
    return ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0))


def func_jvp_velocity_and_dudt(actor):
    def velocity_and_dudt(z, r, t, obs, v):
        return torch.func.jvp(lambda z_, r_, t_: actor(z_, r_, t_, obs), (z, r, t),
                              (v, torch.zeros_like(r), torch.ones_like(t)))
    return velocity_and_dudt


@contextlib.contextmanager
def variant(agent, name: str):
    saved_mish = ofql.mish
    if name.startswith("func.jvp"):
        agent.actor.velocity_and_dudt = func_jvp_velocity_and_dudt(agent.actor)
    if name.endswith("aten"):
        ofql.mish = F.mish
    try:
        yield
    finally:
        ofql.mish = saved_mish
        agent.actor.__dict__.pop("velocity_and_dudt", None)


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    args = ofql.Args(env="hopper-medium-v2", batch_size=cfg.batch_size).resolved()
    agent = ofql.OFQL(HOPPER_SHAPES, args, torch.device("cpu"))
    buffer = random_hopper_buffer()
    names = ["ofql", "func.jvp", "func.jvp+aten"]
    times = {name: [] for name in names}
    for round_ in range(cfg.rounds + 1):  # round 0 warms up
        for name in names:
            with variant(agent, name):
                start = time.perf_counter()
                for i in range(cfg.steps):
                    agent.update(buffer.sample(cfg.batch_size), swap_heads=i % 2 == 0)
                if round_ > 0:
                    times[name].append(cfg.steps / (time.perf_counter() - start))
    result = {"threads": cfg.threads, "batch_size": cfg.batch_size, "torch": torch.__version__,
              "steps_per_second": {k: statistics.median(v) for k, v in times.items()}}
    base = result["steps_per_second"]["func.jvp+aten"]
    print(f"\nOFQL gradient step, batch {cfg.batch_size}, {cfg.threads} thread(s), median of {cfg.rounds} rounds")
    print("| variant | steps/s | ms/step | vs func.jvp+aten |\n|---|---|---|---|")
    for name, value in result["steps_per_second"].items():
        print(f"| {name} | {value:.1f} | {1000 / value:.1f} | {value / base:.2f}x |")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
