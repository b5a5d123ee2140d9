"""Training time per gradient step of each policy class (the paper's Figure 4, left), in one run.

    python benchmarks/train_policies.py --threads 1 --json train_policies.json

Each variant is `ofql.OFQL.update` (critic + actor step, same critic, batch and shapes: hopper, obs 11,
action 3, hidden 256) with another `--policy` and K. Rounds interleave the variants so machine noise
hits all of them alike; the table shows medians, ratios against OFQL and hours for 1M steps.
Paper (A100, 1M steps): OFQL 6.3 h, DQL 11.7 h with K = 5, 49.5 h with K = 50.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import ofql  # noqa: E402
from train_speed import HOPPER_SHAPES, random_hopper_buffer  # noqa: E402  (this folder is on sys.path)


@dataclass
class Config:
    variants: list[str] = field(default_factory=lambda: ["meanflow-1", "flow-5", "flow-10", "diffusion-5",
                                                         "diffusion-50"])
    """`policy-K` pairs to time"""
    threads: int = 1
    """torch CPU threads"""
    batch_size: int = 256
    """transitions per step"""
    seconds: float = 2.0
    """minimum time of one timed round per variant (at least 3 steps)"""
    rounds: int = 5
    """timed rounds per variant (interleaved, after one warm-up round)"""
    json: str | None = None
    """write the results to this JSON file"""


def make_agent(policy: str, steps: int, batch_size: int) -> ofql.OFQL:
    args = baselines.BaselineArgs(env="hopper-medium-v2", batch_size=batch_size, policy=policy,
                                  policy_steps=steps).resolved()
    return ofql.OFQL(HOPPER_SHAPES, args, torch.device("cpu"))


def seconds_per_step(agent: ofql.OFQL, buffer: ofql.ReplayBuffer, batch_size: int, min_time: float) -> float:
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < min_time:
        agent.update(buffer.sample(batch_size), swap_heads=steps % 2 == 0)
        steps += 1
    return (time.perf_counter() - start) / steps


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    buffer = random_hopper_buffer(torch.device("cpu"))
    agents = {}
    for name in cfg.variants:
        policy, _, steps = name.rpartition("-")
        if not policy or not steps.isdigit():
            raise ValueError(f"variant '{name}' is not `policy-K` (e.g. diffusion-5)")
        agents[name] = make_agent(policy, int(steps), cfg.batch_size)
    times = {name: [] for name in agents}
    for round_ in range(cfg.rounds + 1):  # round 0 warms up
        for name, agent in agents.items():
            elapsed = seconds_per_step(agent, buffer, cfg.batch_size, cfg.seconds if round_ else 0.0)
            if round_:
                times[name].append(elapsed)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    base = ms.get("meanflow-1", next(iter(ms.values())))
    rows = [{"variant": name, "ms_per_step": value, "steps_per_second": 1000 / value, "vs_ofql": value / base,
             "hours_per_1M_steps": value * 1e6 / 1000 / 3600} for name, value in ms.items()]
    print(f"\ntraining step (critic + actor), batch {cfg.batch_size}, hopper shapes, {cfg.threads} thread(s), "
          f"median of {cfg.rounds} rounds; torch {torch.__version__}")
    print("| policy-K | ms/step | steps/s | time vs OFQL | hours per 1M steps |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['ms_per_step']:.1f} | {row['steps_per_second']:.1f} | "
              f"{row['vs_ofql']:.2f}x | {row['hours_per_1M_steps']:.1f} |")
    result = {"threads": cfg.threads, "batch_size": cfg.batch_size, "rounds": cfg.rounds, "torch": torch.__version__,
              "rows": rows}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
