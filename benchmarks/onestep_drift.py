"""How far the Q term pulled a checkpoint's one-step map away from its own flow (docs/ogbench.md, "Where the one-step map goes").

The BC loss fits the whole average-velocity field u(z, r, t; s), but with the logit-normal time sampler almost no
(r, t) pair lands near (0, 1), the only pair the one-step policy a = clip(e - u(e, 0, 1; s), -1, 1) uses and the Q
term pushes. This script compares, on states of a dataset file (the validation split of an OGBench file by default)
and the same noise e, the one-step action with a 20-step Euler integration of the same network's instantaneous
velocity u(z, t, t; s) (the flow BC learned), and with the dataset's action; it also reports the fraction of
clipped (saturated) action coordinates and the critic's Q (min of the two heads) of the three. A one-step map that stays
a flow sample has an rms gap to the integration far below its gap to the data; a collapsed one sits at +-1.

    python benchmarks/onestep_drift.py RUN_DIR/checkpoint.pt [...] --data /work/ogbench-data/cube-single-play-v0-val.npz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ofql_eval  # noqa: E402
import ofql  # noqa: E402

# the columns both this script and `vs_fql.py drift` (FQL's runs) print after their own
METRICS_HEADER = ("one-step vs flow | one-step vs data | flow vs data | Q data / one-step / flow "
                  "| saturated one-step / flow / data")


def euler_flow(actor: ofql.MeanFlowActor, noise: torch.Tensor, obs: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dz/dt = u(z, t, t; s) from t = 1 (noise) to t = 0 in `steps` equal Euler steps, then clip."""
    z = noise
    for k in range(steps):
        t = torch.full((len(z),), 1 - k / steps)
        z = z - actor(z, t, t, obs) / steps
    return z.clamp(-1.0, 1.0)


@torch.no_grad()
def drift(checkpoint: str, observations: np.ndarray, actions: np.ndarray, steps: int, seed: int) -> dict:
    """The one-step map of `checkpoint` against its flow and the data, on the given (raw) observations."""
    agent, task, normalizer, args = ofql_eval.load_agent(checkpoint, torch.device("cpu"), kernels="torch")
    if observations.shape[1] != task.obs_dim:
        raise ValueError(f"{checkpoint} expects {task.obs_dim}-dim observations, the data has "
                         f"{observations.shape[1]}: give --data the file it was trained on")
    obs, action = torch.from_numpy(normalizer(observations)).float(), torch.from_numpy(actions).float()
    actor, critic = agent.actor, agent.critic
    noise = torch.randn(action.shape, generator=torch.Generator().manual_seed(seed))
    one_step, flow = actor.act(obs, noise), euler_flow(actor, noise, obs, steps)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()  # noqa: E731
    q = lambda a: critic(obs, a).min(0).values.mean().item()  # noqa: E731
    saturated = lambda a: (a.abs() > 0.999).float().mean().item()  # noqa: E731
    settings = ("eta", "time_sampler", "target_q", "normalize_q", "adaptive_weight", "lr_decay", "hidden_dim")
    return {"checkpoint": checkpoint, "step": agent.step, **{key: getattr(args, key) for key in settings},
            "rms_one_step_vs_flow": rms(one_step, flow),
            "rms_one_step_vs_data": rms(one_step, action), "rms_flow_vs_data": rms(flow, action),
            "q_data": q(action), "q_one_step": q(one_step), "q_flow": q(flow),
            "saturated_one_step": saturated(one_step), "saturated_flow": saturated(flow),
            "saturated_data": saturated(action)}


def metrics_cells(row: dict) -> str:
    """A drift row's METRICS_HEADER cells."""
    return (f"{row['rms_one_step_vs_flow']:.3f} | {row['rms_one_step_vs_data']:.3f} | {row['rms_flow_vs_data']:.3f} "
            f"| {row['q_data']:.1f} / {row['q_one_step']:.1f} / {row['q_flow']:.1f} "
            f"| {row['saturated_one_step']:.2f} / {row['saturated_flow']:.2f} / {row['saturated_data']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, help="an OGBench .npz file (observations, actions)")
    parser.add_argument("--states", type=int, default=2048, help="dataset states drawn (default 2048)")
    parser.add_argument("--flow-steps", type=int, default=20, help="Euler steps of the flow integration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    data = np.load(cli.data)
    rows = np.random.default_rng(cli.seed).choice(len(data["observations"]), cli.states, replace=False)
    results = [drift(path, data["observations"][rows], data["actions"][rows], cli.flow_steps, cli.seed)
               for path in cli.checkpoints]
    print(f"| run | step | eta | sampler | {METRICS_HEADER} |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {Path(r['checkpoint']).parent.name} | {r['step']} | {r['eta']} | {r['time_sampler']} "
              f"| {metrics_cells(r)} |")
    if cli.json:
        Path(cli.json).write_text(json.dumps({"data": cli.data, "states": cli.states, "flow_steps": cli.flow_steps,
                                              "seed": cli.seed, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
