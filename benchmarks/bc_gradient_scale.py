"""How much MeanFlow's adaptive weight rescales the BC gradient, i.e. what eta means under it (docs/algorithm.md).

With --adaptive-weight p each sample's squared error e is divided by sg(e + 1e-3)^p, so the BC gradient is no longer the
paper's: this script measures by how much. For each checkpoint, and for a freshly initialised actor of the same task
and settings, it draws batches of the task's transitions and computes, on the same batch, noise and times, the
gradient of the BC loss over the actor's weights with weight power p and with p = 0 (the paper's plain squared error).
The ratio of the two gradient norms is the factor the BC term is scaled by against the Q term; eta under p is the
paper's eta divided by that factor. It also reports the plain loss, the mean per-sample error e behind the factor
(roughly E[(e + 1e-3)^-p]).

    python benchmarks/bc_gradient_scale.py RUN/checkpoint.pt [...] --power 0.5 --json scale.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ofql_eval  # noqa: E402
import ofql  # noqa: E402


def gradient_norm(actor: ofql.MeanFlowActor, obs, action, args: ofql.Args, power: float,
                  seed: int) -> tuple[float, float]:
    """(norm of the BC loss's gradient over the actor's weights, the loss) with adaptive weight `power`; the batch's
    noise and times come from `seed`, so two powers see the same draws."""
    actor.zero_grad(set_to_none=True)
    loss = ofql.meanflow_bc_loss(actor, obs, action, dataclasses.replace(args, adaptive_weight=power),
                                 torch.Generator().manual_seed(seed))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None]).norm().item(), loss.item()


def measure(actor, data, args, power: float, batches: int, batch_size: int, seed: int) -> dict:
    """Mean gradient-norm ratio (p over 0) over `batches` batches, and the plain loss (the mean per-sample error e)."""
    rng = np.random.default_rng(seed)
    ratios, errors = [], []
    for b in range(batches):
        rows = torch.from_numpy(rng.choice(len(data["obs"]), batch_size, replace=False))
        obs, action = data["obs"][rows], data["action"][rows]
        weighted, _ = gradient_norm(actor, obs, action, args, power, seed + b)
        plain, error = gradient_norm(actor, obs, action, args, 0.0, seed + b)
        ratios.append(weighted / plain)
        errors.append(error)
    return {"gradient_ratio": float(np.mean(ratios)), "gradient_ratio_std": float(np.std(ratios)),
            "mean_error": float(np.mean(errors))}


@functools.lru_cache(maxsize=2)
def task_transitions(env: str, d4rl_mirror: str | None) -> dict:
    """The task's raw transitions, read once for all the checkpoints of one task."""
    return ofql.load_task(env, d4rl_mirror=d4rl_mirror)[1]


def scale(checkpoint: str, power: float, batches: int, batch_size: int, seed: int) -> dict:
    """measure() for the checkpoint's actor and for a fresh actor of the same task and settings."""
    agent, task, normalizer, args = ofql_eval.load_agent(checkpoint, torch.device("cpu"), kernels="torch")
    raw = task_transitions(args.env, args.d4rl_mirror)
    data = {"obs": torch.from_numpy(normalizer(raw["obs"])).float(), "action": torch.from_numpy(raw["action"]).float()}
    torch.manual_seed(seed)
    fresh = ofql.OFQL(task, args, torch.device("cpu")).actor
    return {"checkpoint": checkpoint, "env": args.env, "step": agent.step, "power": power,
            "trained_with_power": args.adaptive_weight, "batches": batches, "batch_size": batch_size,
            "trained": measure(agent.actor, data, args, power, batches, batch_size, seed),
            "initialisation": measure(fresh, data, args, power, batches, batch_size, seed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--power", type=float, default=0.5, help="adaptive weight power p compared with 0")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rows = [scale(path, cli.power, cli.batches, cli.batch_size, cli.seed) for path in cli.checkpoints]
    print(f"| run | env | step | at | BC gradient, p = {cli.power} over p = 0 | mean error e (plain BC loss) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for at in ("initialisation", "trained"):
            m = row[at]
            print(f"| {Path(row['checkpoint']).parent.name} | {row['env']} | {row['step']} | {at} "
                  f"| {m['gradient_ratio']:.2f} +- {m['gradient_ratio_std']:.2f} | {m['mean_error']:.3f} |")
    if cli.json:
        Path(cli.json).write_text(json.dumps({"runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
