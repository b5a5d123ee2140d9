"""Diagnostics of why OFQL ends below the data on a Minari MuJoCo dataset (docs/calibration.md sections 11, 13, 15).

    python benchmarks/medium_diagnostics.py bc-heldout --weight-decay 0.1 --steps 30000 --json bc-wd0.1.json
    python benchmarks/medium_diagnostics.py critic RUN/checkpoint_{5000,10000,20000}.pt --json critic.json
    python benchmarks/medium_diagnostics.py regression-bc --loss l1 --steps 30000 --json bc-l1.json
    python benchmarks/medium_diagnostics.py selection RUN/checkpoint.pt --noise-scales 0.25 1.0 --json selection.json

bc-heldout: the one-step actor trained by BC alone (no critic) on the first 90% of the transitions, AdamW with
the given weight decay, lr and cosine decay as the MuJoCo preset; every 2,500 steps the score of the deterministic
action (10 episodes), the MeanFlow loss on training and held-out transitions, and the deterministic action's MSE
to the data's actions. Overfitting shows as a held-out loss above the training loss.

critic: for each checkpoint, the min target-Q of the data's actions against the data's discounted return-to-go
(states of terminated episodes), how much the critic prefers the policy's deterministic action to the data's,
and along rollouts of that action its predicted Q(s_t, pi(s_t)) against the realized discounted return-to-go
(the last 300 steps of a truncated episode left out: their tail is unknown). A critic that over-values the
policy misleads the Q term.

selection: for each checkpoint, rollouts of the deterministic action and of the argmax of `--samples` one-step
candidates by the min target-Q at each noise scale: the score and length, how much the chosen action's Q exceeds the
deterministic action's at the same state, and the predicted Q against the realized return-to-go. It tells whether
the critic ranks candidates right (selection helps) or wrong (selection breaks the policy).

regression-bc: no flow, no critic: a deterministic MLP (the actor's 3 x 256 Mish, tanh output) fitted to every
transition by mean squared error (the conditional mean action, as TD3+BC with alpha 0) or absolute error (the
conditional median: for a tanh-squashed Gaussian behaviour, tanh of its mean, the behaviour's deterministic
policy); its score every 2,500 steps. It says which level plain BC of the file reaches, and whether that level
depends on the estimator.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval as ofql_eval  # noqa: E402
import ofql  # noqa: E402
import ofql_data  # noqa: E402


def discounted_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out, running = np.zeros(len(rewards)), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + gamma * running
        out[i] = running
    return out


def bc_setup(env: str, steps: int, seed: int):
    """What both BC diagnostics start from: the preset's Args (no Q term), a seeded batch generator, the task and
    the dataset's normalised observations and actions as tensors."""
    args = ofql.Args(env=env, eta=0.0, seed=seed, total_steps=steps, eval_protocol="deterministic").resolved()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    task, data = ofql.load_task(env)
    normalizer = ofql.Normalizer.fit(data["obs"], True)
    obs = torch.as_tensor(normalizer(data["obs"]), dtype=torch.float32)
    action = torch.as_tensor(data["action"], dtype=torch.float32)
    return args, generator, task, normalizer, obs, action


def bc_heldout(env: str, weight_decay: float, steps: int, seed: int) -> list[dict]:
    args, generator, task, normalizer, obs, action = bc_setup(env, steps, seed)
    n_train = int(0.9 * len(obs))  # transitions are in episode order: the held-out 10% are whole later episodes
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    opt = torch.optim.AdamW(agent.actor.parameters(), lr=args.lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    @torch.no_grad()
    def loss_on(lo: int, hi: int) -> float:
        fixed = torch.Generator().manual_seed(123)
        idx = torch.randint(lo, hi, (8192,), generator=fixed)
        return float(ofql.meanflow_bc_loss(agent.actor, obs[idx], action[idx], args, fixed))

    @torch.no_grad()
    def deterministic_mse(lo: int, hi: int) -> float:
        return float((agent.actor.act(obs[lo:hi], torch.zeros(hi - lo, task.act_dim)) - action[lo:hi]).pow(2).mean())

    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (args.batch_size,), generator=generator)
        agent.optimise(agent.actor.bc_loss(obs[idx], action[idx], args), agent.actor, opt)
        schedule.step()
        if step % 2500 == 0:
            score = ofql.evaluate(agent, task, normalizer, args, 10, args.seed, step)["score_mean"]
            rows.append({"step": step, "score": score, "train_loss": loss_on(0, n_train),
                         "heldout_loss": loss_on(n_train, len(obs)), "det_mse_train": deterministic_mse(0, 20_000),
                         "det_mse_heldout": deterministic_mse(n_train, len(obs)), "seconds": time.time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


class RegressionAgent:
    """What ofql.evaluate needs of an agent, for a deterministic regressor: `actor` and `evaluation_act`."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        self.actor = torch.nn.Sequential(ofql.mlp([obs_dim, hidden, hidden, hidden, act_dim]), torch.nn.Tanh())
        self.actor.act_dim = act_dim  # the noise's size, which sample_actions draws and this policy ignores

    def evaluation_act(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.actor(obs)


def regression_bc(env: str, loss: str, steps: int, seed: int) -> list[dict]:
    args, generator, task, normalizer, obs, action = bc_setup(env, steps, seed)
    agent = RegressionAgent(task.obs_dim, task.act_dim)
    opt = torch.optim.Adam(agent.actor.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    error = torch.nn.functional.l1_loss if loss == "l1" else torch.nn.functional.mse_loss
    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(obs), (args.batch_size,), generator=generator)
        opt.zero_grad()
        error(agent.actor(obs[idx]), action[idx]).backward()
        opt.step()
        schedule.step()
        if step % 2500 == 0:
            score = ofql.evaluate(agent, task, normalizer, args, 10, args.seed, step)["score_mean"]
            rows.append({"step": step, "loss": loss, "score": score, "seconds": time.time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def terminated_samples(env: str, gamma: float, states: int) -> tuple[ofql.Task, np.ndarray, np.ndarray, np.ndarray]:
    """The task, and `states` (observation, action, discounted return-to-go) of the dataset's terminated episodes
    (a truncated episode's return-to-go is unknown past its end)."""
    import minari

    task, _ = ofql.load_task(env, with_data=False)
    obs, action, to_go = [], [], []
    for ep in minari.load_dataset(ofql_data.MINARI_SOURCE.get(env, env)).iterate_episodes():
        if ep.terminations[-1]:
            obs.append(ep.observations[:-1])
            action.append(ep.actions)
            to_go.append(discounted_to_go(ep.rewards, gamma))
    pick = np.random.default_rng(0).choice(sum(map(len, obs)), states, replace=False)
    return task, *(np.concatenate(x)[pick] for x in (obs, action, to_go))


def load_agent(path: str) -> tuple[ofql.OFQL, ofql.Task, ofql.Args, ofql.Normalizer, int]:
    """An OFQL checkpoint as (agent, task, resolved args, normalizer, step), through eval.load_agent (its errors)."""
    agent, task, normalizer, args = ofql_eval.load_agent(path, torch.device("cpu"))
    return agent, task, args, normalizer, agent.step


def min_target_q(agent: ofql.OFQL, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    return agent.critic_target(obs, action).min(0).values.squeeze(-1)


def deterministic_action(agent: ofql.OFQL, obs: torch.Tensor) -> torch.Tensor:
    return agent.evaluation_act(obs, torch.zeros(len(obs), agent.actor.act_dim))


def rollouts(task: ofql.Task, normalizer: ofql.Normalizer, policy, episodes: int, gamma: float) -> dict:
    """`episodes` episodes of policy(normalised obs) -> (action, its min target-Q): the score and length of each,
    and per step the predicted Q against the realized discounted return-to-go (the last 300 steps of a truncated
    episode left out: their tail is unknown)."""
    predicted, realized, scores, lengths = [], [], [], []
    for episode in range(episodes):
        env = task.make_env()
        o, _ = env.reset(seed=1000 + episode)
        q_path, rewards, term, trunc = [], [], False, False
        while not (term or trunc):
            action, q = policy(torch.as_tensor(normalizer(o[None]), dtype=torch.float32))
            q_path.append(float(q))
            o, reward, term, trunc, _ = env.step(action[0].numpy())
            rewards.append(reward)
        keep = len(rewards) if term else max(len(rewards) - 300, 0)
        predicted += q_path[:keep]
        realized += list(discounted_to_go(np.array(rewards), gamma)[:keep])
        scores.append(100 * (sum(rewards) - task.ref_min) / (task.ref_max - task.ref_min))
        lengths.append(len(rewards))
    return {"rollout_predicted_q": float(np.mean(predicted)), "rollout_realized": float(np.mean(realized)),
            "rollout_score": float(np.mean(scores)), "rollout_length": float(np.mean(lengths))}


def critic_check(checkpoints: list[str], states: int, episodes: int) -> list[dict]:
    rows, samples = [], {}
    for path in checkpoints:
        agent, task, args, normalizer, step = load_agent(path)
        key = (args.env, args.gamma)  # the checkpoints of one run share their samples: read the dataset once
        if key not in samples:
            samples[key] = terminated_samples(args.env, args.gamma, states)
        _, obs, action, to_go = samples[key]

        def deterministic(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pi = deterministic_action(agent, o)
            return pi, min_target_q(agent, o, pi)

        with torch.no_grad():
            normalized = torch.as_tensor(normalizer(obs), dtype=torch.float32)
            q_pi = deterministic(normalized)[1]
            q_data = min_target_q(agent, normalized, torch.as_tensor(action, dtype=torch.float32))
            rollout = rollouts(task, normalizer, deterministic, episodes, args.gamma)
        rows.append({"checkpoint": path, "step": step, "q_data_actions": float(q_data.mean()),
                     "data_return_to_go": float(to_go.mean()), "q_pi_minus_q_data": float((q_pi - q_data).mean()),
                     "fraction_q_pi_above": float((q_pi > q_data).float().mean()),
                     **{k: v for k, v in rollout.items() if k != "rollout_length"}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def selection_check(checkpoints: list[str], samples: int, noise_scales: list[float], episodes: int) -> list[dict]:
    rows = []
    for path in checkpoints:
        agent, task, args, normalizer, step = load_agent(path)
        for scale in [0.0, *noise_scales]:  # 0: the deterministic action, the reference every gain is measured from
            select = dataclasses.replace(args, eval_select="argmax", eval_samples=samples, eval_noise_scale=scale)
            gains = []

            def chosen(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                reference = deterministic_action(agent, o)
                action = reference if scale == 0.0 else ofql.sample_actions(agent, o, select)
                q = min_target_q(agent, o, action)
                gains.append(float(q - min_target_q(agent, o, reference)))
                return action, q

            torch.manual_seed(0)
            with torch.no_grad():
                rollout = rollouts(task, normalizer, chosen, episodes, args.gamma)
            rows.append({"checkpoint": path, "step": step, "env": args.env,
                         "selection": "deterministic" if scale == 0.0 else f"argmax of {samples}, noise {scale}",
                         "q_chosen_minus_q_deterministic": float(np.mean(gains)), **rollout})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    bc = sub.add_parser("bc-heldout")
    bc.add_argument("--env", default="standin/hopper/medium-v0")
    bc.add_argument("--weight-decay", type=float, default=0.0)
    bc.add_argument("--steps", type=int, default=30_000)
    bc.add_argument("--seed", type=int, default=0)
    critic = sub.add_parser("critic")
    critic.add_argument("checkpoints", nargs="+")
    critic.add_argument("--states", type=int, default=20_000)
    critic.add_argument("--episodes", type=int, default=10)
    selection = sub.add_parser("selection")
    selection.add_argument("checkpoints", nargs="+")
    selection.add_argument("--samples", type=int, default=50)
    selection.add_argument("--noise-scales", type=float, nargs="+", default=[1.0])
    selection.add_argument("--episodes", type=int, default=5)
    regression = sub.add_parser("regression-bc")
    regression.add_argument("--env", default="standin/hopper/medium-v0")
    regression.add_argument("--loss", choices=["l2", "l1"], default="l2")
    regression.add_argument("--steps", type=int, default=30_000)
    regression.add_argument("--seed", type=int, default=0)
    for p in (bc, critic, selection, regression):
        p.add_argument("--json", help="write the rows here")
        p.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.mode == "bc-heldout":
        rows = bc_heldout(opts.env, opts.weight_decay, opts.steps, opts.seed)
    elif opts.mode == "regression-bc":
        rows = regression_bc(opts.env, opts.loss, opts.steps, opts.seed)
    elif opts.mode == "selection":
        rows = selection_check(opts.checkpoints, opts.samples, opts.noise_scales, opts.episodes)
    else:
        rows = critic_check(opts.checkpoints, opts.states, opts.episodes)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
