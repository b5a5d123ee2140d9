"""Tests of ofql.py: the maths against references, learning that must happen, errors that must be raised.

Run: `pytest -q test_ofql.py` (a few minutes on 2 CPU cores). Nothing here downloads: Minari datasets
are built in temporary folders with `minari.create_dataset_from_buffers`.
"""
import ast
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

import baselines
import eval as ofql_eval
import kernels  # needs triton (requirements.txt): missing, the kernel tests must fail, not skip
import ofql
import ofql_data

torch.set_num_threads(1)  # deterministic, and immune to oversubscription on a busy machine


@pytest.fixture(autouse=True)
def _isolated_minari(tmp_path, monkeypatch):
    """Every test sees empty, temporary Minari and OGBench folders (never the user's, never the network)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OGBENCH_DATASET_DIR", str(tmp_path / "ogbench"))


def small_args(**overrides) -> ofql.Args:
    return dataclasses.replace(ofql.Args(env="bandit-8modes"), **overrides).resolved()


def baseline_args(**overrides) -> baselines.BaselineArgs:
    """small_args of `python baselines.py train` (its --policy meanflow: a plain ofql.Args)."""
    return baselines.BaselineArgs(env="bandit-8modes", **overrides).resolved()


# ------------------------------------------------------------------------------------------------
# The MeanFlow target: du/dt along the path, tangents (v, 0, 1) for (z, r, t)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("equal_times", [False, True])
def test_dudt_matches_finite_differences_float64(equal_times):
    torch.manual_seed(1)
    obs_dim, act_dim, batch = 5, 3, 7
    actor = ofql.MeanFlowActor(obs_dim, act_dim, hidden=32, time_scale=3.0).double()
    z, v = torch.randn(batch, act_dim).double(), torch.randn(batch, act_dim).double()
    obs = torch.randn(batch, obs_dim).double()
    t = torch.rand(batch).double() * 0.8 + 0.1
    r = t.clone() if equal_times else t * torch.rand(batch).double()
    u, dudt = actor.velocity_and_dudt(z, r, t, obs, v)
    # central difference of u along (z + h v, r, t + h): the total derivative the JVP must equal
    h = 1e-6
    with torch.no_grad():
        fd = (actor(z + h * v, r, t + h, obs) - actor(z - h * v, r, t - h, obs)) / (2 * h)
        assert torch.allclose(u, actor(z, r, t, obs), atol=1e-12)
    err = (dudt - fd).abs().max().item()
    print(f"max |dudt - finite difference| = {err:.2e}")
    assert err < 1e-6
    # and the classic bug (tangent on r instead of t) gives something else
    with torch.no_grad():
        wrong = (actor(z + h * v, r + h, t, obs) - actor(z - h * v, r - h, t, obs)) / (2 * h)
    assert (wrong - fd).abs().max() > 1e-3


def test_dudt_matches_torch_func_jvp_float32():
    torch.manual_seed(2)
    actor = ofql.MeanFlowActor(11, 3)
    z, v, obs = torch.randn(257, 3), torch.randn(257, 3), torch.randn(257, 11)
    t = torch.rand(257)
    r = t * torch.rand(257)
    u, dudt = actor.velocity_and_dudt(z, r, t, obs, v)
    u_ref, dudt_ref = torch.func.jvp(lambda z_, r_, t_: actor(z_, r_, t_, obs), (z, r, t),
                                     (v, torch.zeros_like(r), torch.ones_like(t)))
    rel = ((dudt - dudt_ref).abs().max() / dudt_ref.abs().max()).item()
    print(f"max relative error vs torch.func.jvp: {rel:.2e}")
    assert rel < 1e-5 and torch.allclose(u, u_ref, atol=1e-6)
    assert u.requires_grad and not dudt.requires_grad  # stop-gradient on the target side


def test_mish_matches_torch_in_value_and_gradient():
    x = (torch.randn(1000, dtype=torch.float64) * 8).requires_grad_()
    y = ofql.mish(x)
    ref = torch.nn.functional.mish(x)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(ofql.mish(x.detach()), ref.detach(), atol=1e-12)  # the inference path
    assert torch.autograd.gradcheck(ofql.mish, (x[:20].detach().requires_grad_(),))
    # mish'(x) for the tangent: kernels.py's one-sigmoid version and ofql.py's plain one (kernels.py absent)
    slope_ref = torch.autograd.grad(ref.sum(), x)[0]
    for name, mish_and_slope in (("kernels", ofql.mish_and_slope), ("plain", ofql.plain_mish_and_slope)):
        value, slope = mish_and_slope(x)
        err = max((value - ref).abs().max().item(), (slope - slope_ref).abs().max().item())
        print(f"{name} mish and slope: max error {err:.2e}")
        assert err < 1e-12 and value.requires_grad and not slope.requires_grad


def test_bc_loss_is_zero_at_the_exact_average_velocity():
    """For data that is a single point a0, the average velocity of z_t -> z_r is exactly
    (z_t - a0) / t, whatever r: a network computing it must have zero MeanFlow loss."""

    a0 = torch.tensor([0.3, -0.5])

    class Exact(ofql.MeanFlowActor):
        def forward(self, z, r, t, obs):
            return (z - a0) / t[:, None]

    actor = Exact(1, 2, hidden=4)

    def velocity_and_dudt(z, r, t, obs, v):
        return torch.func.jvp(lambda z_, r_, t_: actor(z_, r_, t_, obs), (z, r, t),
                              (v, torch.zeros_like(r), torch.ones_like(t)))

    actor.velocity_and_dudt = velocity_and_dudt
    loss = ofql.meanflow_bc_loss(actor, torch.zeros(64, 1), a0.expand(64, 2), small_args(flow_ratio=0.3))
    assert loss.item() < 1e-10


# ------------------------------------------------------------------------------------------------
# Time sampler
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flow_ratio", [0.0, 0.25, 0.5, 1.0])
def test_time_sampler_order_and_flow_ratio(flow_ratio):
    args = small_args(flow_ratio=flow_ratio)
    r, t = ofql.sample_times(1000, args, "cpu")
    assert torch.all(r <= t) and torch.all((t > 0) & (t < 1))
    assert (r == t).float().mean().item() == pytest.approx(flow_ratio, abs=1e-3)


def test_logit_normal_statistics_match_closed_form():
    """t = max and r = min of two N(mu, sigma) draws in logit space: E = mu +- sigma / sqrt(pi),
    Var = sigma^2 (1 - 1/pi)."""
    args = small_args(flow_ratio=0.0, time_mu=-0.4, time_sigma=1.0)
    torch.manual_seed(0)
    r, t = ofql.sample_times(400_000, args, "cpu")
    logit_t, logit_r = torch.logit(t.double()), torch.logit(r.double())
    assert logit_t.mean().item() == pytest.approx(-0.4 + 1 / math.sqrt(math.pi), abs=0.01)
    assert logit_r.mean().item() == pytest.approx(-0.4 - 1 / math.sqrt(math.pi), abs=0.01)
    assert logit_t.var().item() == pytest.approx(1 - 1 / math.pi, abs=0.01)
    uniform = ofql.sample_times(400_000, small_args(flow_ratio=0.0, time_sampler="uniform"), "cpu")
    assert uniform[1].mean().item() == pytest.approx(2 / 3, abs=0.005)  # E max of two U(0,1)
    assert uniform[0].mean().item() == pytest.approx(1 / 3, abs=0.005)


# ------------------------------------------------------------------------------------------------
# Learning on the 2-D bandit
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bc_actors():
    """One-step MeanFlow BC (6000 steps, width 128, lr 2e-3 cosine-decayed: a short version of Figure 3), and
    the same network trained with flow ratio 1 (plain flow matching), sampled in one step."""
    kwargs = dict(hidden=128, lr=2e-3)
    return {"meanflow": baselines.train_toy_bc("meanflow", 6000, **kwargs),
            "flow_matching": baselines.train_toy_bc("meanflow", 6000, flow_ratio=1.0, **kwargs)}


def mass_within_one_std(samples: np.ndarray) -> np.ndarray:
    """Fraction of the samples within 1 std (0.05) of each mode centre: uniform noise puts ~0.2% there."""
    centres, _ = ofql_data.bandit_modes()
    return (np.linalg.norm(samples[:, None] - centres[None], axis=-1) < ofql_data.BANDIT_STD).mean(0)


def test_one_step_meanflow_covers_every_mode_far_above_uniform_noise(bc_actors):
    torch.manual_seed(0)
    with torch.no_grad():
        samples = bc_actors["meanflow"].act(torch.zeros(4000, 1)).numpy()
    uniform = np.random.default_rng(0).uniform(-1, 1, (4000, 2))
    trained, noise = mass_within_one_std(samples), mass_within_one_std(uniform)
    coverage, noise_coverage = baselines.mode_coverage(samples), baselines.mode_coverage(uniform)
    print("mass within 1 std per mode: trained", trained.round(4), "uniform", noise.round(4))
    print("within 2 std:", coverage, "uniform:", noise_coverage)
    assert trained.min() > 4 * noise.max(), "a mode holds no more mass than uniform noise gives it"
    assert coverage["near_mode"] > 5 * noise_coverage["near_mode"] and coverage["near_mode"] > 0.35
    assert 0.08 < coverage["min_mode_share"] and coverage["max_mode_share"] < 0.17, "modes unbalanced"


def test_one_step_meanflow_beats_one_step_flow_matching(bc_actors):
    """Figure 3's contrast on the same network and budget: flow matching in one step lands between the modes."""
    torch.manual_seed(0)
    with torch.no_grad():
        near = {k: baselines.mode_coverage(a.act(torch.zeros(4000, 1)).numpy())["near_mode"] for k, a in bc_actors.items()}
    print("fraction within 2 std of a mode, one step:", near)
    assert near["meanflow"] > 4 * near["flow_matching"]


def test_q_guidance_picks_the_best_mode_and_earns_its_reward(tmp_path):
    """The bandit's score is the mean reward of one-step samples (no critic at evaluation): Q guidance must move
    the policy from the average mode's reward (~0.5) to >= 0.9 of the best mode's (1.0)."""
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path)))
    print("bandit scores over training:", [round(h["score_mean"], 1) for h in summary["history"]])
    assert summary["args"]["eval_select"] == "one"
    assert summary["final_score"] >= 90.0
    assert (tmp_path / summary["run_dir"].split("/")[-1] / "bandit_samples.png").stat().st_size > 1000
    # the deterministic action (e = 0) of the same policy sits on the best mode too
    result = ofql_eval.evaluate_checkpoint(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], seeds=[0],
                                                              eval_protocol="deterministic"))
    assert result["eval_noise_scale"] == 0.0 and result["score_mean"] >= 90.0


# ------------------------------------------------------------------------------------------------
# Critic: TD target, targets, actor loss, and value propagation against an exact Q
# ------------------------------------------------------------------------------------------------
def test_candidate_selection_draws_by_softmax_of_min_target_q_or_takes_the_argmax():
    """DQL's sample_action: candidates scored by min(Q1', Q2'), one drawn with probability softmax(Q x T)."""
    candidates = torch.tensor([[-0.5], [0.0], [0.5]])
    heads = torch.tensor([[1.0, 2.0, 3.0], [1.5, 1.0, 2.5]])  # min: 1.0, 1.0, 2.5

    class Critic(torch.nn.Module):
        def forward(self, obs, action):
            return heads[:, ((action[:, 0] + 0.5) * 2).round().long()]

    agent = SimpleNamespace(evaluation_act=lambda obs: candidates.repeat(len(obs) // 3, 1), critic_target=Critic())
    obs = torch.zeros(20_000, 1)
    torch.manual_seed(0)
    for temperature in (1.0, 2.0):
        args = small_args(eval_select="softmax", eval_samples=3, eval_temperature=temperature)
        picked = ofql.sample_actions(agent, obs, args)[:, 0]
        freq = torch.stack([(picked == c).float().mean() for c in candidates[:, 0]])
        expected = torch.softmax(temperature * torch.tensor([1.0, 1.0, 2.5]), 0)
        print(f"T={temperature}: drawn {freq.numpy().round(3)}, softmax {expected.numpy().round(3)}")
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    best = ofql.sample_actions(agent, obs[:6], small_args(eval_select="argmax", eval_samples=3))
    assert (best == 0.5).all()


def test_eval_protocol_fills_selection_and_eval_py_replaces_it(tmp_path):
    paper = ofql.Args(env="hopper-medium-v2", eval_protocol="paper").resolved()
    assert (paper.eval_select, paper.eval_samples, paper.eval_temperature) == ("softmax", 50, 1.0)
    mujoco = ofql.Args(env="hopper-medium-v2").resolved()  # measured (calibration.md): the best of 50 by min target-Q
    assert (mujoco.eval_protocol, mujoco.eval_select, mujoco.eval_samples, mujoco.eval_noise_scale) == ("argmax", "argmax",
                                                                                                       50, 1.0)
    assert ofql.Args(env="standin/hopper/medium-v0").resolved().eval_protocol == "argmax"  # any other Minari data too
    assert ofql.Args(env="pendulum-swingup").resolved().eval_protocol == "deterministic"
    assert ofql.Args(env="antmaze-large-play-v0").resolved().eval_protocol == "paper"  # unmeasured: the paper's
    assert ofql.Args(env="hopper-medium-v2", eval_protocol="one").resolved().eval_samples == 1
    assert ofql.Args(env="hopper-medium-v2", eval_select="argmax", eval_samples=10).resolved().eval_samples == 10
    with pytest.raises(ValueError, match="eval-temperature"):
        ofql.Args(env="hopper-medium-v2", eval_temperature=0.0).resolved()
    cfg = ofql_eval.EvalArgs(checkpoint="unused", eval_protocol="paper")
    bandit = ofql.Args(env="bandit-8modes").resolved()
    assert bandit.eval_select == "one"
    replaced = ofql_eval.with_eval_selection(bandit, cfg)
    assert (replaced.eval_select, replaced.eval_samples) == ("softmax", 50)
    refined = ofql_eval.with_eval_selection(paper, ofql_eval.EvalArgs(checkpoint="unused", eval_select="argmax"))
    assert (refined.eval_select, refined.eval_samples) == ("argmax", 50)
    deterministic = ofql.Args(env="hopper-medium-v2", eval_protocol="deterministic").resolved()
    assert (deterministic.eval_select, deterministic.eval_samples, deterministic.eval_noise_scale) == ("one", 1, 0.0)
    assert paper.eval_noise_scale == 1.0
    back = ofql_eval.with_eval_selection(deterministic, ofql_eval.EvalArgs(checkpoint="unused", eval_protocol="paper"))
    assert (back.eval_select, back.eval_samples, back.eval_noise_scale) == ("softmax", 50, 1.0)
    argmax = ofql.Args(env="pendulum-swingup", eval_select="argmax").resolved()  # on the deterministic preset
    assert (argmax.eval_select, argmax.eval_samples, argmax.eval_noise_scale) == ("argmax", 50, 1.0)
    ranked = ofql_eval.with_eval_selection(deterministic, ofql_eval.EvalArgs(checkpoint="unused", eval_select="softmax"))
    assert (ranked.eval_select, ranked.eval_samples, ranked.eval_noise_scale) == ("softmax", 50, 1.0)
    spread = ofql_eval.with_eval_selection(paper, ofql_eval.EvalArgs(checkpoint="unused", eval_protocol="paper",
                                                                      eval_noise_scale=0.3))
    assert (spread.eval_select, spread.eval_noise_scale) == ("softmax", 0.3)


class FixedHeads(torch.nn.Module):
    """A target critic whose two heads return given values per next observation (obs[:, 0] indexes them)."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values  # [2, n_obs]

    def forward(self, obs, action):
        return self.values[:, obs[:, 0].long()] + 0 * action.sum(-1)


@pytest.mark.parametrize("target_q, next_q", [("min", [1.0, 4.0, -2.0]), ("mean", [2.0, 4.5, -1.5])])
def test_td_target_is_reward_plus_discounted_min_or_mean_over_heads_masked_by_terminals(target_q, next_q):
    heads = torch.tensor([[1.0, 5.0, -2.0], [3.0, 4.0, -1.0]])
    batch = {"next_obs": torch.tensor([[0.0], [1.0], [2.0]]), "reward": torch.tensor([0.5, 1.0, 2.0]),
             "mask": torch.tensor([1.0, 1.0, 0.0])}
    actor = ofql.MeanFlowActor(1, 2, hidden=8)
    args = small_args(gamma=0.9, max_q_backup=False, target_q=target_q)
    target = ofql.td_target(actor, FixedHeads(heads), batch, args)
    torch.testing.assert_close(target, torch.tensor([0.5 + 0.9 * next_q[0], 1.0 + 0.9 * next_q[1], 2.0]))


def test_td_target_next_actions_use_the_target_noise_scale():
    """--target-noise-scale s: a' = policy(s', s * e), the same noise draw scaled (s = 0: the map of e = 0)."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, obs, action):
            seen.append(action)
            return torch.zeros(2, len(obs))

    actor, next_obs = ofql.MeanFlowActor(3, 2, hidden=8), torch.randn(5, 3)
    batch = {"next_obs": next_obs, "reward": torch.zeros(5), "mask": torch.ones(5), "action": torch.zeros(5, 2)}
    for scale in (0.0, 0.3):
        torch.manual_seed(0)
        ofql.td_target(actor, Recorder(), batch, small_args(target_noise_scale=scale))
        torch.manual_seed(0)
        torch.testing.assert_close(seen[-1], actor.act(next_obs, scale * torch.randn(5, 2)))
    assert not torch.allclose(seen[0], seen[1])


def test_polyak_update_moves_the_targets_by_tau():
    args = small_args(tau=0.1, hidden_dim=16)
    task, data = ofql.load_task("bandit-8modes")
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    before = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0)).sample(64), False)
    for old, new, target in zip(before, agent.critic.parameters(), agent.critic_target.parameters()):
        torch.testing.assert_close(target, 0.9 * old + 0.1 * new)
        assert not torch.equal(new, old)  # the critic was stepped


@pytest.mark.parametrize("normalize_q", [True, False])
def test_actor_loss_normalises_q_by_a_detached_mean_abs_q(normalize_q):
    """d/dtheta of L_BC - eta Q_i / sg(E|Q_j|): the denominator is a constant of the gradient (DQL); with
    normalize_q False there is none (FQL's raw Q)."""
    args = small_args(eta=2.0, hidden_dim=16, normalize_q=normalize_q)
    task, data = ofql.load_task("bandit-8modes")
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    batch = ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0)).sample(32)
    params = list(agent.actor.parameters())
    for swap in (False, True):
        torch.manual_seed(1)
        loss, _ = agent.actor_loss(batch, swap)
        grads = torch.autograd.grad(loss, params)
        torch.manual_seed(1)  # the same noise: BC loss first, then the policy's action
        bc = agent.actor.bc_loss(batch["obs"], batch["action"], args)
        q = agent.critic(batch["obs"], agent.actor.act(batch["obs"]))
        main, norm = (q[1], q[0]) if swap else (q[0], q[1])
        reference = bc - args.eta * main.mean() / (norm.abs().mean().item() if normalize_q else 1.0)
        for g, r in zip(grads, torch.autograd.grad(reference, params)):
            torch.testing.assert_close(g, r)
        assert all(p.grad is None for p in agent.critic.parameters())



def chain_episodes(gamma: float):
    """A 6-state chain s_0 -> ... -> s_5 -> end, reward k + 1 for leaving s_k, the action irrelevant; full
    episodes end in a terminal, others are truncated (time limit) at s_3, and later ones start at s_3.
    Exact Q(s_k, .) = sum_{j >= k} gamma^(j - k) (j + 1)."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(30):
        start, stop = (3, 6) if i % 3 == 2 else (0, 6 if i % 3 == 0 else 3)
        states = np.arange(start, stop + 1, dtype=np.float64)[:, None]
        n = stop - start
        episodes.append(SimpleNamespace(id=i, observations=states, actions=rng.uniform(-1, 1, (n, 1)),
                                        rewards=states[:-1, 0] + 1, terminations=np.arange(n) == 5 - start,
                                        truncations=(np.arange(n) == n - 1) & (stop == 3)))
    exact = np.array([sum(gamma ** (j - k) * (j + 1) for j in range(k, 6)) for k in range(6)])
    return episodes, exact


def test_critic_learns_the_exact_q_of_a_chain_with_terminals_and_truncations():
    """Value must propagate over six steps; a truncated episode must bootstrap (its Q(s_2) needs s_3's value)
    and a terminal must not."""
    episodes, exact = chain_episodes(gamma=0.8)
    data = ofql_data.episodes_to_transitions(episodes)
    assert data["mask"].sum() == len(data["mask"]) - 20  # 20 terminals; the 10 truncations keep mask 1
    args = small_args(gamma=0.8, tau=0.05, eta=0.0, hidden_dim=64, critic_lr=1e-3, lr_decay=False)
    task = ofql.Task(name="chain", obs_dim=1, act_dim=1, make_env=None, ref_min=0.0, ref_max=1.0, ref_source="test")
    torch.manual_seed(0)
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    buffer = ofql.ReplayBuffer({k: v.astype(np.float32) for k, v in data.items()}, torch.device("cpu"),
                               torch.Generator().manual_seed(0))
    for i in range(3000):
        agent.update(buffer.sample(128), swap_heads=i % 2 == 0)
    with torch.no_grad():
        states = torch.arange(6.0)[:, None]
        q = agent.critic(states.repeat(5, 1), torch.linspace(-1, 1, 5).repeat_interleave(6)[:, None]).view(2, 5, 6)
    print("exact Q:", exact.round(2), "\nlearnt (mean over actions and heads):", q.mean((0, 1)).numpy().round(2))
    np.testing.assert_allclose(q.numpy(), np.broadcast_to(exact, q.shape), rtol=0.05)


# ------------------------------------------------------------------------------------------------
# Minari data, training end to end, checkpoints
# ------------------------------------------------------------------------------------------------
def make_hopper_dataset(dataset_id: str, episodes: int = 4, max_steps: int = 60, nan: str | None = None):
    """A tiny Minari dataset of real Hopper-v5 transitions (random actions)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=max_steps)
    env.action_space.seed(0)
    buffers = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        rec = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, term, trunc, _ = env.step(action)
            for key, value in zip(rec, (obs, action, reward, term, trunc)):
                rec[key].append(value)
            done = term or trunc
        if nan is not None and ep == 1:  # one bad number in the second episode
            bad = np.array(rec[nan][3], dtype=np.float64)
            bad.flat[0] = np.inf
            rec[nan][3] = bad
        buffers.append(EpisodeBuffer(id=ep, **{k: np.asarray(v) for k, v in rec.items()}))
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, ref_min_score=-20.272305,
                                              ref_max_score=3234.3, algorithm_name="random",
                                              author="test", author_email="none", code_permalink="test")


def test_transitions_follow_minari_episodes():
    dataset = make_hopper_dataset("test/hopper/tiny-v0")
    data = ofql_data.episodes_to_transitions(dataset.iterate_episodes())
    episodes = list(dataset.iterate_episodes())
    assert len(data["obs"]) == sum(len(ep.actions) for ep in episodes) == dataset.total_steps
    first = episodes[0]
    n = len(first.actions)
    np.testing.assert_allclose(data["next_obs"][: n], first.observations[1:])
    np.testing.assert_allclose(data["obs"][n], episodes[1].observations[0])
    # terminal steps have mask 0; truncated (time-limit) ends keep mask 1
    ends = np.cumsum([len(ep.actions) for ep in episodes]) - 1
    for ep, end in zip(episodes, ends):
        assert data["mask"][end] == (0.0 if ep.terminations[-1] else 1.0)
    assert data["mask"].sum() == len(data["mask"]) - sum(ep.terminations.sum() for ep in episodes)


def test_train_on_tiny_minari_dataset_checkpoints_and_resumes(tmp_path):
    make_hopper_dataset("test/hopper/tiny-v0")
    base = ofql.Args(env="test/hopper/tiny-v0", out_dir=str(tmp_path), total_steps=40, eval_every=20,
                     eval_episodes=2, batch_size=32, hidden_dim=64, log_every=10, eta=0.1, grad_norm=5.0)
    first = ofql.train(dataclasses.replace(base, total_steps=20))
    assert first["steps"] == 20 and np.isfinite(first["final_score"])
    ckpt = ofql.load_checkpoint(first["checkpoint"])
    assert ckpt["agent"]["step"] == 20 and ckpt["obs_mean"].shape == (11,)
    # the critic really learned something: parameters moved away from their initial values
    torch.manual_seed(base.seed)
    init = ofql.TwinCritic(11, 3, 64, layer_norm=ckpt["args"]["critic_layer_norm"])  # the Minari preset's: on
    moved = max((ckpt["agent"]["critic"][k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-4
    # resume: same run folder, continues to the new total and keeps the history
    state = ofql.load_checkpoint(first["checkpoint"])
    state["args"]["total_steps"] = 40
    torch.save(state, first["checkpoint"])
    resumed = ofql.train(ofql.Args(resume=first["checkpoint"]))
    assert resumed["steps"] == 40 and resumed["run_dir"] == first["run_dir"]
    assert [h["step"] for h in resumed["history"]] == [20, 40]
    summary = json.loads((tmp_path / first["run_dir"].split("/")[-1] / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["score_source"].endswith("metadata")


def test_resume_is_exact(tmp_path):
    """20 steps + resume for 20 ends with the same parameters as 40 uninterrupted steps (constant lr: a
    cosine decay over --total-steps differs between a 20- and a 40-step run from the first step)."""
    make_hopper_dataset("test/hopper/tiny-v0")
    base = ofql.Args(env="test/hopper/tiny-v0", out_dir=str(tmp_path), eval_every=20, eval_episodes=1, lr_decay=False,
                     batch_size=16, hidden_dim=32, eta=0.1, grad_norm=5.0, ema_actor=True, ema_start=5, ema_every=2)
    straight = ofql.train(dataclasses.replace(base, total_steps=40, exp_name="straight"))
    half = ofql.train(dataclasses.replace(base, total_steps=20, exp_name="half"))
    state = ofql.load_checkpoint(half["checkpoint"])
    state["args"]["total_steps"] = 40
    torch.save(state, half["checkpoint"])
    ofql.train(ofql.Args(resume=half["checkpoint"]))
    a = ofql.load_checkpoint(straight["checkpoint"])["agent"]
    b = ofql.load_checkpoint(half["checkpoint"])["agent"]
    for net in ("actor", "actor_target", "critic", "critic_target"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"


# ------------------------------------------------------------------------------------------------
# Your own data: ofql.train(args, data=..., make_env=..., ref_scores=...) (docs/own_data.md)
# ------------------------------------------------------------------------------------------------
def test_in_memory_data_trains_exactly_as_the_same_task_by_name(tmp_path):
    """The tiny Minari dataset's arrays and eval env handed to ofql.train under a name of one's own (the same preset:
    any other dataset's) end with the same parameters and scores as training by its id; a run without make_env
    trains and checkpoints without evaluating, and resumes with the data passed again."""
    make_hopper_dataset("test/hopper/tiny-v0")
    task, data = ofql.load_task("test/hopper/tiny-v0")
    kept = {key: value.copy() for key, value in data.items()}
    common = dict(out_dir=str(tmp_path), total_steps=20, eval_every=10, eval_episodes=1, batch_size=16, hidden_dim=32)
    by_name = ofql.train(ofql.Args(env="test/hopper/tiny-v0", **common))
    mine = ofql.train(ofql.Args(env="my-hopper", **common), data=data, make_env=task.make_env,
                      ref_scores=(task.ref_min, task.ref_max))
    assert all(np.array_equal(kept[key], data[key]) for key in kept)  # the caller's arrays are left as they were
    a, b = (ofql.load_checkpoint(run["checkpoint"]) for run in (by_name, mine))
    for net in ("actor", "critic", "critic_target"):
        assert all(torch.equal(a["agent"][net][key], b["agent"][net][key]) for key in a["agent"][net])
    assert [h["score_mean"] for h in a["history"]] == [h["score_mean"] for h in b["history"]] and len(a["history"]) == 2
    assert b["args"]["env"] == "my-hopper" and "ref_scores" in mine["score_source"]
    unevaluated = ofql.train(ofql.Args(env="my-hopper", **common | {"total_steps": 10}), data=data)
    assert (unevaluated["history"], unevaluated["final_score"]) == ([], None)
    state = ofql.load_checkpoint(unevaluated["checkpoint"])
    state["args"]["total_steps"] = 20
    torch.save(state, unevaluated["checkpoint"])
    assert ofql.train(ofql.Args(resume=unevaluated["checkpoint"]), data=data)["steps"] == 20


def good_data(n: int = 100) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    return {"obs": obs, "action": rng.uniform(-1, 1, size=(n, 1)), "reward": rng.normal(size=n), "next_obs": obs + 0.1,
            "mask": np.ones(n), "episode_end": np.arange(n) % 10 == 9}


def with_bad(key, value):
    return {**good_data(), key: value}


def with_nan_in_row_7():
    data = good_data()
    data["obs"] = data["obs"].copy()
    data["obs"][7, 1] = np.nan
    return data


@pytest.mark.parametrize("data, message", [
    ({**good_data(), "actions": np.zeros((100, 1))},
     "data must be a dict of the arrays obs, action, reward, next_obs, mask and optionally episode_end"),
    ({k: v for k, v in good_data().items() if k != "mask"}, "data must be a dict of the arrays obs, action"),
    (with_bad("obs", np.array([None] * 100)), r"data\['obs'\] is object of shape \(100,\): give numbers of shape "
                                              r"\[N, dims\]"),
    (with_bad("reward", np.array(["1.0"] * 100)), r"data\['reward'\] is <U3 of shape \(100,\): give numbers of shape"),
    (with_bad("reward", np.zeros(99)), r"data\['reward'\] has 99 rows, data\['obs'\] 100: give one row per transition"),
    (with_nan_in_row_7(), r"data\['obs'\] holds NaN/Inf \(first in row 7\): drop or fix those transitions"),
    (with_bad("next_obs", np.zeros((100, 2))), r"data\['next_obs'\] has shape \(100, 2\), data\['obs'\] \(100, 3\)"),
    (with_bad("action", np.linspace(-2, 2, 100)[:, None]), r"data\['action'\] is outside \[-1, 1\] \(-2 to 2\): "
                                                           r"rescale it.*RescaleAction\(env, -1, 1\)"),
    (with_bad("mask", np.full(100, 2.0)), r"data\['mask'\] is outside \[0, 1\]: give mask = 1 - terminal"),
    (with_bad("mask", (np.arange(100) % 10 == 9).astype(float)), r"data\['episode_end'\] is 0 where data\['mask'\] "
                                                                 r"is 0 .*not the terminal flag itself"),
])
def test_in_memory_data_errors_name_the_array_and_the_fix(tmp_path, data, message):
    """Each bad array is one ValueError naming it and its fix, raised before the run folder exists; a mask given
    as the terminal flag is caught by episode_end. The good data trains (ints and bools are accepted)."""
    args = ofql.Args(env="mine", out_dir=str(tmp_path / "runs"), total_steps=2, batch_size=8, hidden_dim=8)
    with pytest.raises(ValueError, match=message):
        ofql.train(args, data=data)
    assert not (tmp_path / "runs").exists()
    fine = {**good_data(), "mask": np.ones(100, dtype=bool), "reward": np.arange(100)}  # bool / int arrays
    assert ofql.train(args, data=fine)["steps"] == 2


def test_in_memory_task_names_and_eval_envs_that_do_not_fit_are_refused(tmp_path):
    args = ofql.Args(env="mine", out_dir=str(tmp_path), total_steps=2, batch_size=8, hidden_dim=8)
    with pytest.raises(ValueError, match="args.env 'pendulum-swingup' names a task of this project.*Args\\(env="):
        ofql.train(ofql.Args(out_dir=str(tmp_path)), data=good_data())  # the default env
    pendulum = lambda **kwargs: gym.make("Pendulum-v1", **kwargs)  # noqa: E731  (actions in [-2, 2])
    with pytest.raises(ValueError, match=r"make_env\(\) gives observations of shape \(3,\) and actions Box\(-2.0, "
                                         r"2.0.*wrap the env in gymnasium.wrappers.RescaleAction\(env, -1, 1\)"):
        ofql.train(args, data=good_data(), make_env=pendulum)
    fitted = lambda **kwargs: gym.wrappers.RescaleAction(pendulum(**kwargs), -1, 1)  # noqa: E731
    summary = ofql.train(dataclasses.replace(args, eval_every=2, eval_episodes=1), data=good_data(), make_env=fitted)
    assert summary["history"][0]["ref_source"] == "none (score = 100 x raw return)"
    assert summary["final_score"] == pytest.approx(100 * summary["history"][0]["return_mean"])


def pendulum_in_unit_box(**kwargs) -> gym.Env:
    return gym.wrappers.RescaleAction(gym.make("Pendulum-v1", **kwargs), -1, 1)


def test_evaluation_cannot_change_training(tmp_path):
    """Evaluation draws from its own generator: evaluating every 2 or every 6 steps, or with another protocol, leaves
    the parameters at step 6 bit-identical (issue 28 item 3: runs with different protocols are paired)."""
    states = []
    for i, (every, protocol) in enumerate([(2, "argmax"), (6, "argmax"), (3, "paper")]):
        args = ofql.Args(env="mine", out_dir=str(tmp_path / str(i)), total_steps=6, batch_size=8, hidden_dim=8, seed=3,
                         eval_every=every, eval_episodes=1, eval_protocol=protocol)
        agent = ofql.load_checkpoint(ofql.train(args, data=good_data(), make_env=pendulum_in_unit_box)["checkpoint"])
        states.append({f"{net}.{k}": v for net in ("actor", "critic") for k, v in agent["agent"][net].items()})
    for state in states[1:]:
        assert state.keys() == states[0].keys() and all(torch.equal(state[k], states[0][k]) for k in state)


class SeedRecordingBandit(ofql_data.BanditEnv):
    """The bandit's one-step env, recording every reset seed in `seeds` and starting from `start`."""

    seeds: list = []
    start = np.zeros(1)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.seeds.append(seed)
        return self.start.copy(), {}


def test_evaluation_seeds_never_collide_and_leave_the_global_rng_alone(monkeypatch):
    """Env seeds from SeedSequence([seed, step]): the old 10,000 x seed + step + i put seed 0 at step 20k on seed 1's
    starts at 10k; now no (seed, step, episode) of this grid shares one, and evaluation leaves torch's RNG as it was."""
    monkeypatch.setattr(SeedRecordingBandit, "seeds", [])
    task = dataclasses.replace(ofql.load_task("bandit-8modes", with_data=False)[0],
                               make_env=lambda **kwargs: SeedRecordingBandit())
    args = small_args(hidden_dim=8)
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    keys = [(seed, step) for seed in range(3) for step in range(0, 20_001, 1000)]
    before = torch.get_rng_state()
    for seed, step in keys:
        ofql.evaluate(agent, task, ofql.Normalizer(np.zeros(1), np.ones(1)), args, 5, seed, step)
    assert torch.equal(before, torch.get_rng_state())
    assert len(SeedRecordingBandit.seeds) == 5 * len(keys) == len(set(SeedRecordingBandit.seeds))


def test_eval_envs_runs_the_episodes_in_waves_with_the_same_seeds_and_scores():
    """--eval-envs 2 runs 5 Pendulum episodes in waves, never more than 2 envs open, each episode on the env seed it has
    side by side: a deterministic policy's per-episode scores (all different) equal the side-by-side run's."""
    open_envs, most_open, seeds = [0], [0], []

    class Counted(gym.Wrapper):
        def reset(self, seed=None, options=None):
            seeds.append(seed)
            return self.env.reset(seed=seed, options=options)

        def close(self):
            open_envs[0] -= 1
            super().close()

    def make_env(**kwargs):
        open_envs[0] += 1
        most_open[0] = max(most_open[0], open_envs[0])
        return Counted(pendulum_in_unit_box(**kwargs))

    task = ofql.Task("pendulum", obs_dim=3, act_dim=1, make_env=make_env, ref_min=-1600.0, ref_max=0.0, ref_source="")
    args = small_args(hidden_dim=8, eval_protocol="deterministic")
    agent, normalizer, results = ofql.OFQL(task, args, torch.device("cpu")), ofql.Normalizer(np.zeros(3), np.ones(3)), {}
    for at_once in (None, 2):
        seeds.clear()
        most_open[0] = 0
        results[at_once] = ofql.evaluate(agent, task, normalizer, dataclasses.replace(args, eval_envs=at_once), 5, 0)
        results[at_once]["seeds"], results[at_once]["most_open"] = list(seeds), most_open[0]
    assert results[None]["most_open"] == 5 and results[2]["most_open"] == 2 and open_envs[0] == 0
    assert results[2]["seeds"] == results[None]["seeds"]
    assert len(set(results[None]["scores"])) == 5
    np.testing.assert_allclose(results[2]["scores"], results[None]["scores"], rtol=1e-6)


def test_evaluation_feeds_the_agent_normalised_observations(monkeypatch):
    """A normalised agent acts on (obs - mean) / std at evaluation, never on raw observations."""
    monkeypatch.setattr(SeedRecordingBandit, "start", np.array([5.0]))
    task = dataclasses.replace(ofql.load_task("bandit-8modes", with_data=False)[0],
                               make_env=lambda **kwargs: SeedRecordingBandit())
    args = small_args(hidden_dim=8)
    agent, seen, sample_actions = ofql.OFQL(task, args, torch.device("cpu")), [], ofql.sample_actions
    monkeypatch.setattr(ofql, "sample_actions", lambda agent, obs, args: seen.append(obs) or sample_actions(agent, obs, args))
    ofql.evaluate(agent, task, ofql.Normalizer(np.array([2.0]), np.array([0.5])), args, 3, seed=0)
    assert torch.equal(torch.cat(seen), torch.full((3, 1), 6.0))


def test_training_normalises_obs_and_next_obs_with_the_dataset_statistics(tmp_path, monkeypatch):
    """The observation statistics are the dataset's (not the env's resets), and next_obs is normalised as obs is."""
    seen, replay_buffer = {}, ofql.ReplayBuffer
    monkeypatch.setattr(ofql, "ReplayBuffer", lambda data, *rest: seen.update(data) or replay_buffer(data, *rest))
    data = good_data()
    data = {**data, "obs": data["obs"] * 3 + 5, "next_obs": data["next_obs"] * 3 + 5}
    args = ofql.Args(env="mine", out_dir=str(tmp_path), total_steps=2, batch_size=8, hidden_dim=8, eval_every=2,
                     eval_episodes=1)
    summary = ofql.train(args, data=data, make_env=pendulum_in_unit_box)
    mean, std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    for key in ("obs", "next_obs"):
        np.testing.assert_allclose(seen[key], (data[key] - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ofql.load_checkpoint(summary["checkpoint"])["obs_mean"].numpy(), mean, rtol=1e-6)


def test_own_data_example_in_the_docs_runs_as_written_next_to_ofql_alone(tmp_path):
    """docs/own_data.md's example, run as written in an empty folder holding ofql.py only."""
    import shutil
    import subprocess

    code = re.search(r"```python\n(.*?)```", (Path(__file__).parent / "docs" / "own_data.md").read_text(), re.S)[1]
    (tmp_path / "example.py").write_text(code)
    shutil.copy(ofql.__file__, tmp_path / "ofql.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch's default threads oversubscribe a busy machine (~10x slower)
    result = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final_score, checkpoint = result.stdout.splitlines()[-1].split()
    assert math.isfinite(float(final_score)) and (tmp_path / checkpoint).exists()
    summary = json.loads((tmp_path / checkpoint).with_name("summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [100, 200] and "ref_scores" in summary["score_source"]


def test_compiled_gradient_step_matches_eager_and_compiles_once_per_head_order(tmp_path):
    """--compile: 20 updates with cosine lr decay and an EMA actor end within 1e-5 of eager (inductor told to draw
    random numbers as eager does); after the first two steps (one per head order) no step compiles again, though
    the lr changes at every step, and Dynamo warns of nothing (no recompile limit hit)."""
    import logging

    import torch._dynamo
    import torch._inductor.config

    task, data = ofql.load_task("bandit-8modes")
    batches = ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0))
    batches = [batches.sample(64) for _ in range(20)]
    agents = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        args = small_args(hidden_dim=32, eta=0.3, grad_norm=1.0, lr_decay=True, total_steps=20, ema_actor=True,
                          ema_start=4, ema_every=2, compile=compiled)
        agents[compiled] = ofql.OFQL(task, args, torch.device("cpu"))
        initial = {net: {k: v.clone() for k, v in getattr(agents[compiled], net).state_dict().items()}
                   for net in ("actor", "actor_target", "critic", "critic_target")}
        torch.manual_seed(1)
        dynamo_log, messages = logging.getLogger("torch._dynamo"), []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        dynamo_log.addHandler(handler)
        try:
            with torch._inductor.config.patch(fallback_random=True):
                for i, batch in enumerate(batches):
                    if compiled and i == 2:
                        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    agents[compiled].update(batch, swap_heads=i % 2 == 1)
        finally:
            dynamo_log.removeHandler(handler)
        # Adam's step recompiled at every new lr until Dynamo's recompile_limit (8), a warning with a stack trace
        assert not [m for m in messages if "recompile_limit" in m or "recompile limit" in m], messages
    assert graphs > 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled, or never compiled"
    eager, compiled = agents[False], agents[True]
    for net in ("actor", "actor_target", "critic", "critic_target"):
        for (name, a), b in zip(getattr(eager, net).named_parameters(), getattr(compiled, net).parameters()):
            error = (a - b).abs().max().item()
            print(f"{net}.{name}: max |eager - compiled| = {error:.1e}")
            assert error < 1e-5, f"{net}.{name}"
            assert not torch.equal(a, initial[net][name]), f"{net}.{name} never moved"
    assert compiled.actor_opt.param_groups[0]["lr"] == pytest.approx(eager.actor_opt.param_groups[0]["lr"])


def test_dataset_folder_path_is_accepted(tmp_path):
    import os
    dataset = make_hopper_dataset("test/hopper/tiny-v0")
    folder = os.path.join(os.environ["MINARI_DATASETS_PATH"], "test", "hopper", "tiny-v0")
    task, data = ofql.load_task(folder)
    assert task.obs_dim == 11 and len(data["obs"]) == dataset.total_steps


def test_train_prints_its_run_folder_first_and_where_everything_is_last(tmp_path, capsys):
    """A first run informs: the run folder before training; at the end the scores, speed, wall time, the paths
    of summary.json, checkpoint and TensorBoard events, and an eval.py command that parses."""
    import tyro

    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=3, eval_every=3,
                                   hidden_dim=32))
    lines = capsys.readouterr().out.strip().splitlines()
    run_dir, ckpt = Path(summary["run_dir"]), summary["checkpoint"]
    print("\n".join(lines))
    assert lines[0] == f"OFQL, one step on bandit-8modes, 3 steps; run folder: {run_dir}"
    last = lines[-1]
    assert last.startswith(f"done: final normalized score {summary['final_score']:.1f}, "
                           f"best {summary['best_score']:.1f}; {summary['steps_per_second']:.1f} steps/s, "
                           f"{summary['wall_time_s']:.1f} s; ")
    assert f"summary {run_dir / 'summary.json'}, checkpoint {ckpt}, TensorBoard {run_dir}; " in last
    assert (run_dir / "summary.json").exists() and Path(ckpt).exists() and list(run_dir.glob("events.out.tfevents.*"))
    command = last.split("evaluate: ")[1].split()
    assert command[:2] == ["python", "eval.py"]
    assert tyro.cli(ofql_eval.EvalArgs, args=command[2:]).checkpoint == ckpt


# ------------------------------------------------------------------------------------------------
# Errors a user can run into
# ------------------------------------------------------------------------------------------------
def test_unknown_task_names_the_closest_match():
    with pytest.raises(ValueError, match="did you mean 'hopper-medium-v2'"):
        ofql.load_task("hoper-medium-v2")


def test_missing_dataset_offline_says_where_and_how(monkeypatch):
    import minari

    def no_network(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(minari, "load_dataset", no_network)
    with pytest.raises(FileNotFoundError, match="MINARI_DATASETS_PATH=.*minari download mujoco/hopper/medium-v0"):
        ofql.load_task("mujoco/hopper/medium-v0")


@pytest.mark.parametrize("field,name", [("rewards", "reward"), ("observations", "obs"), ("actions", "action")])
def test_nan_or_inf_in_dataset_is_refused(field, name):
    make_hopper_dataset("test/hopper/nan-v0", nan=field)
    with pytest.raises(ValueError, match=f"test/hopper/nan-v0: '{name}' has 1 NaN/Inf values \\(first in episode 1\\)"):
        ofql.load_task("test/hopper/nan-v0")


@pytest.mark.parametrize("field,value,interval", [
    ("flow_ratio", 1.5, "[0, 1]"), ("eta", -0.1, "[0, inf)"), ("eta", math.nan, "[0, inf)"), ("lr", 0.0, "(0, inf)"),
    ("critic_lr", math.inf, "(0, inf)"), ("gamma", 1.0, "(0, 1)"), ("tau", 0.0, "(0, 1]"), ("grad_norm", math.nan,
    "(-inf, inf)"), ("eval_temperature", 0.0, "(0, inf)"), ("eval_noise_scale", -1.0, "[0, inf)"),
    ("target_noise_scale", math.nan, "[0, inf)"), ("time_sigma", 0.0, "(0, inf)"), ("ema_decay", 1.5, "[0, 1]"),
    ("adaptive_weight", -1.0, "[0, inf)"), ("reward_scale", math.inf, "(-inf, inf)")])
def test_invalid_hyperparameters_are_refused(field, value, interval):
    """Every float flag is checked for finiteness and range before any work, and the message names flag and range
    (docs/reliability.md's table of bad inputs)."""
    message = f"--{field.replace('_', '-')} {value} must be a finite number in {interval}"
    with pytest.raises(ValueError, match=re.escape(message)):
        small_args(**{field: value})


@pytest.mark.parametrize("field", ["batch_size", "total_steps", "eval_episodes", "eval_every", "max_q_samples",
                                   "eval_envs"])
def test_counts_below_one_are_refused(field):
    with pytest.raises(ValueError, match=re.escape(f"--{field.replace('_', '-')} 0 must be a finite number in [1, inf)")):
        small_args(**{field: 0})


@pytest.mark.parametrize("field,value,choices", [
    ("target_q", "maen", "min, mean"), ("time_sampler", "unifrom", "logit-normal, uniform"),
    ("eval_protocol", "papr", "paper, argmax, one, deterministic"), ("eval_select", "sofmax", "one, softmax, argmax"),
    ("preset", "dql", "ofql, paper"), ("kernels", "cuda", "auto, triton, torch"), ("time_sampler", None, "logit-normal")])
def test_invalid_literal_flags_are_refused(field, value, choices):
    """tyro checks a command line's choices, not an Args(...) built in Python: resolved() refuses a bad value (target_q
    fell through to min, time_sampler to uniform, eval_protocol raised a bare KeyError), None only where the type allows."""
    with pytest.raises(ValueError, match=re.escape(f"invalid arguments: --{field.replace('_', '-')} {value!r} must be "
                                                   f"one of {choices}")):
        small_args(**{field: value})


def test_literal_flags_are_checked_from_the_type_hints_with_the_numeric_ones():
    """Every bad flag in one error, a subclass's Literal fields (baselines.py's --policy) too; every choice resolves."""
    with pytest.raises(ValueError) as error:
        small_args(target_q="maen", eval_protocol="papr", eta=math.nan)
    assert str(error.value) == ("invalid arguments: --eta nan must be a finite number in [0, inf); --target-q 'maen' "
                                "must be one of min, mean; --eval-protocol 'papr' must be one of paper, argmax, one, "
                                "deterministic")
    with pytest.raises(ValueError, match=re.escape("--policy 'flw' must be one of meanflow, flow, diffusion")):
        baseline_args(policy="flw")
    for field, values in {"target_q": ("min", "mean"), "time_sampler": ("logit-normal", "uniform"), "eval_protocol": (
            "paper", "argmax", "one", "deterministic"), "eval_select": ("one", "softmax", "argmax")}.items():
        for value in values:
            assert getattr(small_args(**{field: value}), field) == value
    assert small_args(target_q=None, eval_protocol=None, eval_select=None).target_q == "min"  # None: the preset's
    assert not list(ofql.literal_problems(ofql.Args()))  # unresolved: None where the type has `| None`


def test_nan_eta_stops_before_any_work(tmp_path):
    """`--eta nan` used to train until the divergence guard; now the run stops first and creates nothing."""
    with pytest.raises(ValueError, match=re.escape("--eta nan must be a finite number in [0, inf)")):
        ofql.train(ofql.Args(env="bandit-8modes", eta=math.nan, out_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_missing_or_unreadable_file_names_the_flag_and_the_fix(tmp_path):
    for path in (tmp_path / "nowhere" / "checkpoint.pt", tmp_path):  # missing; a folder, not a file
        with pytest.raises(ValueError, match="cannot read the checkpoint .*give --resume \\(eval.py: --checkpoint\\) "
                           "an existing, readable file, runs/<run>/checkpoint.pt"):
            ofql.train(ofql.Args(resume=str(path)))


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ofql.load_checkpoint(bad)
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=2, eval_every=2,
                                   hidden_dim=32))
    whole = open(summary["checkpoint"], "rb").read()
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ofql.load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not an OFQL checkpoint"):
        ofql.load_checkpoint(bad)


class CreatesAFile:
    """A pickled object whose unpickling runs code: open(marker, "w") creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker, hostile = tmp_path / "code_ran", tmp_path / "checkpoint.pt"
    torch.save({"format": ofql.CHECKPOINT_FORMAT, "args": {}, "payload": CreatesAFile(marker)}, hostile)
    with pytest.raises(ValueError, match=f"{hostile} is not a safe OFQL checkpoint.*io.open"):
        ofql.load_checkpoint(hostile)
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_v1_checkpoint_says_it_is_from_an_older_version(tmp_path):
    old = tmp_path / "checkpoint.pt"
    torch.save({"format": "ofql-checkpoint-v1", "obs_mean": np.zeros(3, np.float32),
                "rng": {"numpy": np.random.get_state()}}, old)  # v1 pickled numpy arrays
    with pytest.raises(ValueError, match="not a safe OFQL checkpoint.*numpy.*older ofql.py \\(v1"):
        ofql.load_checkpoint(old)


@pytest.mark.parametrize("option, default, other", [("mujoco_data", "d4rl", "minari"),
                                                     ("q_scale_running_max", False, True)])
def test_checkpoint_of_a_dropped_option(tmp_path, option, default, other):
    """An older version's option: at its default the field is dropped and the file opens (it trained as this version
    does); otherwise it is refused (--mujoco-data minari: this version would read D4RL's data for the name;
    --q-scale-running-max: this version's actor loss is another)."""
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=2, eval_every=2))
    state = torch.load(summary["checkpoint"], weights_only=True)
    for value in (default, other):
        path = tmp_path / f"{value}.pt"
        torch.save(state | {"args": state["args"] | {option: value}}, path)
        if value == default:
            assert option not in ofql.load_checkpoint(path)["args"]
            ofql_eval.load_agent(str(path), torch.device("cpu"))  # eval.py opens it too
    with pytest.raises(ValueError, match=f"trained with --{option.replace('_', '-')}.*which this version dropped"):
        ofql.load_checkpoint(path)


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=3, eval_every=3,
                                   hidden_dim=32))
    state = ofql.load_checkpoint(summary["checkpoint"])  # weights_only=True
    assert state["format"] == "ofql-checkpoint-v2" and isinstance(state["obs_mean"], torch.Tensor)
    # the RNG states round-trip: restoring them gives the same next draws
    generator = torch.Generator().manual_seed(5)
    saved = ofql.rng_state(generator)
    before = (np.random.rand(3), random.random(), np.random.randn(), torch.rand(2), torch.rand(2, generator=generator))
    ofql.set_rng_state(saved, generator)
    after = (np.random.rand(3), random.random(), np.random.randn(), torch.rand(2), torch.rand(2, generator=generator))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(before, after))


def test_pendulum_builtin_dataset_builds_offline_without_warnings():
    with warnings.catch_warnings(record=True) as caught:  # the quickstart task: no third-party notice either
        warnings.simplefilter("always")
        task, data = ofql.load_task("pendulum-swingup")
        env = task.make_env()
    assert not [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    assert task.obs_dim == 3 and task.act_dim == 1
    assert np.all(np.abs(data["action"]) <= 1.0) and len(data["obs"]) == 100 * 200
    assert data["mask"].min() == 1.0  # Pendulum never terminates: time limits are not terminals
    behaviour = 100 * (data["reward"].sum() / 100 - task.ref_min) / (task.ref_max - task.ref_min)
    assert 25 < behaviour < 65, behaviour
    assert env.action_space.low[0] == -1.0 and env.action_space.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# D4RL v2 HDF5 -> Minari
# ------------------------------------------------------------------------------------------------
def write_d4rl_hdf5(path, n: int = 25, next_observations: bool = True):
    """A synthetic file in D4RL's layout: a terminal at 6, a timeout at 14, an unfinished tail."""
    import h5py

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 11))
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[6], timeouts[14] = True, True
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        if next_observations:
            f["next_observations"] = obs + 100.0
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = np.arange(n, dtype=np.float64), terminals, timeouts
    return obs


def test_d4rl_hdf5_converts_to_episodes_with_terminal_and_timeout_boundaries(tmp_path):
    import os
    root = tmp_path / "minari"
    hdf5 = root / "d4rl_downloads" / "hopper_medium-v2.hdf5"
    hdf5.parent.mkdir(parents=True)
    obs = write_d4rl_hdf5(hdf5)
    assert os.environ["MINARI_DATASETS_PATH"] == str(root)
    task, data = ofql.load_task("hopper-medium-v2")  # finds the file: no download
    np.testing.assert_allclose(data["reward"], np.arange(25))
    np.testing.assert_allclose(data["obs"], obs)
    # within an episode next_obs is the following observation; at a boundary it is next_observations
    np.testing.assert_allclose(data["next_obs"][:6], obs[1:7])
    np.testing.assert_allclose(data["next_obs"][[6, 14, 24]], obs[[6, 14, 24]] + 100.0)
    expected_mask = np.ones(25)
    expected_mask[6] = 0.0  # terminal; the timeout at 14 and the cut tail bootstrap
    np.testing.assert_array_equal(data["mask"], expected_mask)
    assert (task.ref_min, task.ref_max) == (-20.272305, 3234.3) and "d4rl/hopper/medium-v2" in task.ref_source
    env = task.make_env()
    assert env.spec.id == "Hopper-v4"


def test_d4rl_hdf5_without_next_observations_never_links_two_episodes(tmp_path):
    """Like d4rl.qlearning_dataset: the last step of a timeout (and of the file's unfinished tail) has no
    next observation, since observations[i + 1] starts the next episode, so it is dropped; the terminal
    step is kept with mask 0 and a timeout is never a terminal."""
    hdf5 = tmp_path / "no_next.hdf5"
    obs = write_d4rl_hdf5(hdf5, next_observations=False)
    dataset = ofql_data.d4rl_hdf5_to_minari(hdf5, "test/d4rl/no-next-v0", "Hopper-v4", 0.0, 1.0)
    data = ofql_data.episodes_to_transitions(dataset.iterate_episodes())
    kept = [i for i in range(25) if i not in (14, 24)]  # 14: timeout, 24: last step of the tail
    np.testing.assert_array_equal(data["reward"], kept)  # rewards are the step indices
    np.testing.assert_array_equal(data["obs"], obs[kept])
    within = [j for j, i in enumerate(kept) if i != 6]  # every bootstrapped transition goes from step i to i + 1
    np.testing.assert_array_equal(data["next_obs"][within], obs[np.array(kept)[within] + 1])
    bootstrapped = data["next_obs"][data["mask"] == 1]  # never the first observation of another episode
    assert not any(np.array_equal(x, obs[first]) for x in bootstrapped for first in (7, 15))
    np.testing.assert_array_equal(data["mask"], [0.0 if i == 6 else 1.0 for i in kept])
    assert [len(ep.actions) for ep in dataset.iterate_episodes()] == [7, 7, 9]


def test_d4rl_offline_without_file_says_where_to_put_it(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(FileNotFoundError, match="walker2d_medium_replay-v2.hdf5"):
        ofql.load_task("walker2d-medium-replay-v2")


def test_d4rl_download_from_a_mirror_is_checked_before_it_is_kept(tmp_path, monkeypatch):
    """--d4rl-mirror / OFQL_D4RL_MIRROR replace D4RL's server; the file lands as .part and gets its final
    name only if it opens with every D4RL array of one length, else the error names the override."""
    import os
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_d4rl_hdf5(mirror / "hopper_medium_expert-v2.hdf5")
    raw = (mirror / "hopper_medium_expert-v2.hdf5").read_bytes()
    (mirror / "hopper_medium_replay-v2.hdf5").write_bytes(raw[: len(raw) // 2])  # a download cut halfway
    downloads = Path(os.environ["MINARI_DATASETS_PATH"]) / "d4rl_downloads"
    monkeypatch.setenv("OFQL_D4RL_MIRROR", mirror.as_uri())
    task, data = ofql.load_task("hopper-medium-expert-v2")
    assert len(data["reward"]) == 25 and (downloads / "hopper_medium_expert-v2.hdf5").exists()
    with pytest.raises(FileNotFoundError, match="--d4rl-mirror") as error:
        ofql.load_task("hopper-medium-replay-v2")
    print(error.value)
    assert "truncated" in str(error.value) and not list(downloads.glob("hopper_medium_replay*"))
    # the flag wins over the environment variable; a file without D4RL's arrays is refused too
    import h5py
    other = tmp_path / "other"
    other.mkdir()
    with h5py.File(other / "walker2d_medium-v2.hdf5", "w") as f:
        f["observations"] = np.zeros((4, 17))
    with pytest.raises(FileNotFoundError, match=r"missing D4RL arrays \['actions'"):
        ofql.load_task("walker2d-medium-v2", d4rl_mirror=other.as_uri())


# ------------------------------------------------------------------------------------------------
# Reliability: kills, bad inputs, divergence
# ------------------------------------------------------------------------------------------------
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL after a checkpoint resumes and ends exactly where a run that was never
    killed ends (parameters and logged evaluations)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    make_hopper_dataset("test/hopper/tiny-v0")
    common = dict(env="test/hopper/tiny-v0", total_steps=400, eval_every=100, save_every=50, eval_episodes=1,
                  batch_size=16, hidden_dim=32, eta=0.1, grad_norm=5.0, threads=1)
    straight = ofql.train(ofql.Args(out_dir=str(tmp_path / "straight"), **common))
    code = f"import ofql; ofql.train(ofql.Args(out_dir={str(tmp_path / 'killed')!r}, **{common!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(ofql.__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = next((tmp_path / "killed").glob("*/checkpoint.pt"))
    killed_at = ofql.load_checkpoint(ckpt)["agent"]["step"]
    assert 0 < killed_at < 400, killed_at
    resumed = ofql.train(ofql.Args(resume=str(ckpt)))
    a = ofql.load_checkpoint(straight["checkpoint"])
    b = ofql.load_checkpoint(resumed["checkpoint"])
    for net in ("actor", "critic", "critic_target"):
        for key in a["agent"][net]:
            assert torch.equal(a["agent"][net][key], b["agent"][net][key]), f"{net}.{key}"
    assert a["history"] == b["history"]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    make_hopper_dataset("test/hopper/tiny-v0")
    summary = ofql.train(ofql.Args(env="test/hopper/tiny-v0", out_dir=str(tmp_path), total_steps=10, eval_every=10,
                                   eval_episodes=1, batch_size=16, hidden_dim=32))
    before = open(summary["checkpoint"], "rb").read()

    def dies_midway(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    state = ofql.load_checkpoint(summary["checkpoint"])
    agent = ofql.OFQL(ofql.load_task("test/hopper/tiny-v0")[0], ofql.Args(**state["args"]).resolved(),
                      torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        ofql.save_checkpoint(ofql.Path(summary["checkpoint"]), agent, ofql.Args(**state["args"]),
                             ofql.Normalizer(state["obs_mean"].numpy(), state["obs_std"].numpy()), torch.Generator(), [])
    assert open(summary["checkpoint"], "rb").read() == before


def test_divergence_is_detected_saved_and_stops(tmp_path):
    with pytest.raises(ofql.DivergenceError, match="divergence at step"):
        ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), critic_lr=10.0, total_steps=300,
                             log_every=5, eval_every=300, hidden_dim=32))
    diag = list(tmp_path.glob("*/diverged_*.pt"))
    assert len(diag) == 1 and ofql.load_checkpoint(diag[0])["agent"]["step"] <= 300
    assert not list(tmp_path.glob("*/summary.json"))


def test_check_divergence_bounds():
    ok = {"charts/q_mean": 90.0, "charts/target_q_mean": 95.0, "losses/bc_loss": 0.5}
    assert ofql.check_divergence(ok, 100.0) is None
    assert "exceeds the bound" in ofql.check_divergence({**ok, "charts/q_mean": -150.0}, 100.0)
    assert "non-finite losses/bc_loss" in ofql.check_divergence({**ok, "losses/bc_loss": float("nan")}, 100.0)


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the run folder .* writable --out-dir"):
        ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(blocker / "runs"), total_steps=5))


def test_run_folders_are_never_reused(tmp_path):
    args = ofql.Args(env="bandit-8modes", out_dir=str(tmp_path)).resolved()
    assert ofql.make_run_dir(args) != ofql.make_run_dir(args)


def test_batch_larger_than_dataset_is_refused(tmp_path):
    make_hopper_dataset("test/hopper/tiny-v0", episodes=1, max_steps=20)
    with pytest.raises(ValueError, match="larger than the dataset"):
        ofql.train(ofql.Args(env="test/hopper/tiny-v0", out_dir=str(tmp_path / "runs"), batch_size=256))
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_unbounded_action_space_is_refused():
    import minari
    from minari.data_collector import EpisodeBuffer

    obs = np.zeros((4, 2))
    buffer = EpisodeBuffer(id=0, observations=obs, actions=np.zeros((3, 1)), rewards=np.zeros(3),
                           terminations=np.zeros(3, bool), truncations=np.array([False, False, True]))
    minari.create_dataset_from_buffers(
        "test/unbounded/box-v0", [buffer], action_space=gym.spaces.Box(-np.inf, np.inf, (1,)),
        observation_space=gym.spaces.Box(-np.inf, np.inf, (2,)), algorithm_name="none", author="t",
        author_email="none", code_permalink="none")
    with pytest.raises(ValueError, match="not a bounded Box"):
        ofql.load_task("test/unbounded/box-v0")


def test_checkpoint_from_another_task_is_refused(tmp_path):
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=2, eval_every=2,
                                   hidden_dim=32))
    state = ofql.load_checkpoint(summary["checkpoint"])
    other = ofql.Task("other", 11, 3, None, 0.0, 1.0, "")
    agent = ofql.OFQL(other, ofql.Args(env="other", hidden_dim=32).resolved(), torch.device("cpu"))
    with pytest.raises(ValueError, match="does not fit this task"):
        agent.load_state_dict(state["agent"])


def test_cli_exits_non_zero_with_one_clear_line():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "ofql.py", "--env", "hoper-medium-v2"], capture_output=True, text=True,
                            cwd=os.path.dirname(ofql.__file__), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown task 'hoper-medium-v2'; did you mean")


def test_folded_actor_equals_the_one_step_policy():
    torch.manual_seed(3)
    actor = ofql.MeanFlowActor(17, 6)
    obs, noise = torch.randn(9, 17), torch.randn(9, 6)
    with torch.no_grad():
        err = (ofql_eval.fold(actor)(obs, noise) - actor.act(obs, noise)).abs().max().item()
    print(f"folded vs unfolded max error {err:.2e}")
    assert err < 1e-5


# ------------------------------------------------------------------------------------------------
# eval.py
# ------------------------------------------------------------------------------------------------
def test_eval_checkpoint_gives_finite_scores_per_seed(tmp_path):
    make_hopper_dataset("test/hopper/tiny-v0")
    summary = ofql.train(ofql.Args(env="test/hopper/tiny-v0", out_dir=str(tmp_path), total_steps=10, eval_every=10,
                                   eval_episodes=1, batch_size=16, hidden_dim=32))
    out = tmp_path / "eval.json"
    result = ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], episodes=3, seeds=[0, 1],
                                               json=str(out)))
    assert len(result["per_seed"]) == 2 and all(len(r["scores"]) == 3 for r in result["per_seed"])
    assert np.isfinite(result["score_mean"]) and np.isfinite(result["score_std_seeds"])
    assert json.loads(out.read_text())["episodes_per_seed"] == 3


def test_eval_ema_tracks_an_averaged_actor_evaluates_it_and_eval_py_switches_it(tmp_path):
    """--eval-ema: the EMA copy follows ema_decay (checked against the closed-form lerp), evaluation samples it and
    not the live actor, checkpoints keep both, eval.py picks either and refuses an EMA a run never had."""
    args = small_args(out_dir=str(tmp_path), total_steps=40, eval_every=20, eval_ema=True, ema_start=10, ema_every=5,
                      keep_checkpoints=True)
    task, data = ofql.load_task(args.env)
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    assert agent.actor_ema is not agent.actor and agent.actor_target is agent.actor  # TD target: the live actor
    buffer = ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0))
    for _ in range(14):
        agent.update(buffer.sample(64), swap_heads=False)
    before = [p.clone() for p in agent.actor_ema.parameters()]
    agent.update(buffer.sample(64), swap_heads=False)  # step 15: an EMA update with decay ema_decay
    for old, ema, live in zip(before, agent.actor_ema.parameters(), agent.actor.parameters()):
        torch.testing.assert_close(ema, args.ema_decay * old + (1 - args.ema_decay) * live)
    assert any((ema - live).abs().max() > 1e-4 for ema, live in zip(agent.actor_ema.parameters(), agent.actor.parameters()))
    obs, noise = torch.zeros(5, task.obs_dim), torch.randn(5, task.act_dim)
    torch.manual_seed(1)
    evaluated = ofql.sample_actions(agent, obs, args)
    torch.manual_seed(1)
    torch.testing.assert_close(evaluated, agent.actor_ema.act(obs))
    assert not torch.allclose(agent.actor_ema.act(obs, noise), agent.actor.act(obs, noise))

    summary = ofql.train(args)
    run = Path(summary["run_dir"])
    assert (run / "checkpoint_20.pt").exists() and (run / "checkpoint_40.pt").exists()
    ema, *_ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"))
    live, *_ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"), eval_ema=False)
    assert ema.evaluation_act.__self__ is ema.actor_ema and live.actor_ema is live.actor
    torch.testing.assert_close(ema.actor.act(obs, noise), live.evaluation_act(obs, noise))  # the live actor is intact
    assert not torch.allclose(ema.evaluation_act(obs, noise), live.evaluation_act(obs, noise))
    plain = ofql.train(small_args(out_dir=str(tmp_path), total_steps=20, eval_every=20))
    with pytest.raises(ValueError, match="no EMA copy"):
        ofql_eval.load_agent(plain["checkpoint"], torch.device("cpu"), eval_ema=True)


def test_eval_noise_scale_scales_the_policy_noise():
    """--eval-noise-scale s: candidates are the policy at s * e; s = 0 is the deterministic map of e = 0."""
    args = small_args()
    task, _ = ofql.load_task(args.env, with_data=False)
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    obs = torch.zeros(7, task.obs_dim)
    for scale in (0.0, 0.5):
        torch.manual_seed(3)
        picked = ofql.sample_actions(agent, obs, dataclasses.replace(args, eval_noise_scale=scale))
        torch.manual_seed(3)
        torch.testing.assert_close(picked, agent.actor.act(obs, scale * torch.randn(7, task.act_dim)))
    zero = ofql.sample_actions(agent, obs, small_args(eval_protocol="deterministic"))
    assert torch.allclose(zero, zero[:1].expand_as(zero))
    torch.testing.assert_close(zero, agent.actor.act(obs, torch.zeros(7, task.act_dim)))
    with pytest.raises(ValueError, match="eval-noise-scale"):
        small_args(eval_noise_scale=-1.0)
    with pytest.raises(ValueError, match="target-noise-scale"):
        small_args(target_noise_scale=-1.0)


def test_eval_video_records_the_first_episode_as_a_gif(tmp_path):
    """Pendulum renders without OpenGL (pygame): one GIF per seed with every other frame of episode 1."""
    from PIL import Image

    summary = ofql.train(ofql.Args(env="pendulum-swingup", out_dir=str(tmp_path), total_steps=4, eval_every=4,
                                   eval_episodes=1, batch_size=16, hidden_dim=32))
    ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], episodes=2, seeds=[0, 1],
                                      video=str(tmp_path / "video")))
    for seed in (0, 1):  # 200 Pendulum steps, every other one at 25 fps (PIL merges identical frames, adding durations)
        with Image.open(tmp_path / "video" / f"seed{seed}.gif") as gif:
            durations = []
            for frame in range(gif.n_frames):
                gif.seek(frame)
                durations.append(gif.info["duration"])
            assert sum(durations) == 100 * 40 and gif.n_frames > 50 and gif.size == (500, 500)


def test_eval_benchmark_quick_mode_writes_json_and_png(tmp_path):
    result = ofql_eval.main(ofql_eval.EvalArgs(benchmark=True, batch_sizes=[1, 3], min_time=0.005, repeats=1,
                                               compile=False, json=str(tmp_path / "b.json"),
                                               plot=str(tmp_path / "b.png")))
    names = {r["policy"] for r in result["rows"]}
    assert {"ofql-1 eager", "ofql-1 folded", "ofql-1 numba", "ofql-1 onnxruntime", "flow-euler-50", "ddpm-5", "ddpm-50",
            "ddim-1"} <= names
    assert all(r["decisions_per_s"] > 0 for r in result["rows"]) and len(result["rows"]) == 2 * len(names)
    assert (tmp_path / "b.png").stat().st_size > 1000 and json.loads((tmp_path / "b.json").read_text())["rows"]


@pytest.mark.parametrize("batch, obs_dim, act_dim", [(1, 17, 6), (7, 29, 8), (257, 11, 3)])
def test_numba_policy_matches_the_torch_policy_with_normalisation(batch, obs_dim, act_dim):
    """The compiled deployment policy (normalisation and time embeddings folded into the first layer,
    Mish via one exp) gives the actions of the torch one-step policy on normalised observations."""
    torch.manual_seed(batch)
    rng = np.random.default_rng(batch)
    actor = ofql.MeanFlowActor(obs_dim, act_dim, time_scale=3.0)
    for layer in actor.net[::2]:  # wide pre-activations, so Mish's large-|x| branches are exercised too
        layer.weight.data *= 2
    normalizer = ofql.Normalizer(rng.normal(size=obs_dim) * 5, rng.uniform(0.1, 3.0, size=obs_dim))
    obs = (rng.normal(size=(batch, obs_dim)) * 5).astype(np.float32)
    noise = rng.normal(size=(batch, act_dim)).astype(np.float32)
    policy = ofql_eval.NumbaPolicy(ofql_eval.fold(actor), normalizer)
    with torch.no_grad():
        ref = actor.act(torch.as_tensor(normalizer(obs)), torch.as_tensor(noise)).numpy()
    out = policy(obs, noise)
    err = np.abs(out - ref).max()
    print(f"max |numba - torch| = {err:.2e}, clipped {(np.abs(ref) == 1.0).mean():.2f}")
    # fp32: folding 1/std into the weights reorders the rounding; pre-clip outputs reach ~10 here
    assert out.shape == (batch, act_dim) and err < 3e-5 and np.abs(ref).max() <= 1.0
    if batch > 1:  # some actions clipped, some not: the clip is tested too
        assert 0 < (np.abs(ref) == 1.0).mean() < 1
    # one raw observation in, one action out; drawn noise is seeded and in bounds
    assert policy(obs[0]).shape == (act_dim,)
    first = ofql_eval.NumbaPolicy(ofql_eval.fold(actor), normalizer, seed=3)(obs)
    again = ofql_eval.NumbaPolicy(ofql_eval.fold(actor), normalizer, seed=3)(obs)
    assert np.array_equal(first, again) and np.abs(first).max() <= 1.0 and not np.array_equal(first, out)


@pytest.mark.parametrize("obs_dim, act_dim, hidden", [(11, 3, 64), (17, 6, 37)])
def test_onnx_export_matches_the_torch_policy_with_normalisation(tmp_path, obs_dim, act_dim, hidden):
    """One exported file (dynamic batch axis) run by onnxruntime at batch 1, 7 and 257 gives the actions of
    the torch one-step policy on normalised observations (fp32: max error < 1e-5)."""
    torch.manual_seed(obs_dim)
    rng = np.random.default_rng(obs_dim)
    actor = ofql.MeanFlowActor(obs_dim, act_dim, hidden, time_scale=3.0)
    for layer in actor.net[::2]:  # wide pre-activations: Mish's tails, and 35-65% of the actions clipped
        layer.weight.data *= 1.5
    normalizer = ofql.Normalizer(rng.normal(size=obs_dim) * 5, rng.uniform(0.1, 3.0, size=obs_dim))
    ofql_eval.export_onnx(ofql_eval.fold(actor), normalizer, tmp_path / "policy.onnx")
    policy = ofql_eval.OnnxPolicy(tmp_path / "policy.onnx")
    for batch in (1, 7, 257):
        obs = (rng.normal(size=(batch, obs_dim)) * 5).astype(np.float32)
        noise = rng.normal(size=(batch, act_dim)).astype(np.float32)
        with torch.no_grad():
            ref = actor.act(torch.as_tensor(normalizer(obs)), torch.as_tensor(noise)).numpy()
        out = policy(obs, noise)
        err = np.abs(out - ref).max()
        print(f"batch {batch}, obs {obs_dim}, act {act_dim}: max |onnxruntime - torch| = {err:.2e}, "
              f"clipped {(np.abs(ref) == 1.0).mean():.2f}")
        assert out.shape == (batch, act_dim) and out.dtype == np.float32 and err < 1e-5
    assert 0 < (np.abs(ref) == 1.0).mean() < 1  # the clip is exercised
    assert policy(obs[0]).shape == (act_dim,) and np.abs(policy(obs)).max() <= 1.0  # own noise draw


def test_eval_exports_a_checkpoint_to_onnx(tmp_path):
    """`eval.py --checkpoint ... --export-onnx FILE`: the file acts like the checkpoint's policy on raw observations."""
    summary = ofql.train(ofql.Args(env="bandit-8modes", total_steps=3, eval_every=3, out_dir=str(tmp_path)))
    out = tmp_path / "policy.onnx"
    result = ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], export_onnx=str(out)))
    assert (result["obs_dim"], result["act_dim"]) == (1, 2)
    agent, _, normalizer, _ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"))
    obs = np.random.default_rng(0).normal(size=(5, 1)).astype(np.float32) * 1e-3  # bandit obs are 0: std 1e-3
    noise = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    with torch.no_grad():
        ref = agent.actor.act(torch.as_tensor(normalizer(obs)), torch.as_tensor(noise)).numpy()
    err = np.abs(ofql_eval.OnnxPolicy(out)(obs, noise) - ref).max()
    print(f"bandit checkpoint: max |onnxruntime - torch| = {err:.2e}")
    assert err < 1e-5


def test_eval_runs_a_policy_trained_with_triton_kernels_on_torch(tmp_path):
    """The checkpoint's --kernels is replaced by eval.py's (auto: torch without CUDA)."""
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=2, eval_every=2,
                                   hidden_dim=32))
    state = ofql.load_checkpoint(summary["checkpoint"])
    state["args"]["kernels"] = "triton"  # as if trained on a GPU
    torch.save(state, summary["checkpoint"])
    agent, *_ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"))
    assert agent.actor.backend == ("triton" if torch.cuda.is_available() else "torch")
    result = ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], kernels="torch"))
    assert np.isfinite(result["score_mean"])


def test_eval_refuses_a_checkpoint_of_another_task(tmp_path):
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=2, eval_every=2,
                                   hidden_dim=32))
    state = ofql.load_checkpoint(summary["checkpoint"])
    make_hopper_dataset("test/hopper/tiny-v0")
    state["args"]["env"] = "test/hopper/tiny-v0"  # a bandit network claiming to be a Hopper policy
    torch.save(state, summary["checkpoint"])
    with pytest.raises(ValueError, match="observations have 1 dims, task test/hopper/tiny-v0 has 11"):
        ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"]))


# ------------------------------------------------------------------------------------------------
# AntMaze / Kitchen conventions and the task table
# ------------------------------------------------------------------------------------------------
PAPER_TASKS = [f"{e}-{lv}-v2" for e in ("halfcheetah", "hopper", "walker2d")
               for lv in ("medium", "medium-replay", "medium-expert")] + \
              [f"antmaze-{m}-v0" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                                           "large-diverse")] + [f"kitchen-{m}-v0" for m in ("complete", "partial", "mixed")]


def test_every_paper_task_has_a_preset_and_a_data_source():
    assert len(PAPER_TASKS) == 18
    for name in PAPER_TASKS:
        assert name in ofql_data.DQL_SETTINGS and (name in ofql_data.D4RL_MUJOCO or name in ofql_data.MINARI_SOURCE), name
    assert ofql.task_preset("antmaze-large-play-v0")["eta"] == 4.5 and ofql.task_preset("antmaze-large-play-v0")["max_q_backup"]
    assert ofql.task_preset("walker2d-medium-v2")["grad_norm"] == 1 and ofql.task_preset("kitchen-mixed-v0")["eta"] == 0.005


def test_antmaze_dict_observations_are_flattened_and_relabelled():
    import gymnasium_robotics
    import minari
    from minari.data_collector import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v4", max_episode_steps=30)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    rec = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
    for i in range(12):
        action = env.action_space.sample()
        obs, reward, _, _, _ = env.step(action)
        reward = 1.0 if i in (5, 6) else 0.0  # the goal reached at steps 5 and 6 (v1 data never terminates)
        for key, value in zip(rec, (obs, action, reward, False, i == 11)):
            rec[key].append(value)
    stacked = {k: np.asarray(v) for k, v in rec.items() if k != "observations"}
    stacked["observations"] = {k: np.stack([o[k] for o in rec["observations"]]) for k in obs}
    minari.create_dataset_from_buffers("D4RL/antmaze/umaze-v1", [EpisodeBuffer(id=0, **stacked)], env=env,
                                       algorithm_name="random", author="t", author_email="none",
                                       code_permalink="none")
    task, data = ofql.load_task("antmaze-umaze-v0")
    assert task.obs_dim == 29 and data["obs"].shape == (12, 29)
    np.testing.assert_allclose(data["obs"][:, :2], stacked["observations"]["achieved_goal"][:-1])
    np.testing.assert_allclose(data["obs"][:, 2:], stacked["observations"]["observation"][:-1])
    np.testing.assert_array_equal(data["mask"], [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1])  # terminal = reward > 0
    assert (task.ref_min, task.ref_max) == (0.0, 1.0) and "success rate" in task.ref_source
    eval_env = task.make_env()
    assert eval_env.unwrapped.continuing_task is False
    assert eval_env.reset(seed=0)[0].shape == (29,)
    task_only, no_data = ofql.load_task("antmaze-umaze-v0", with_data=False)  # what eval.py loads
    assert no_data is None and (task_only.obs_dim, task_only.act_dim) == (29, 8)
    assert task_only.make_env().reset(seed=0)[0].shape == (29,)
    args = ofql.Args(env="antmaze-umaze-v0").resolved()
    assert (args.reward_bias, args.reward_scale) == (-0.5, 4.0)  # DQL's (r - 0.5) * 4


def test_kitchen_eval_env_uses_the_d4rl_settings():
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    kitchen = ofql_data.CONVENTIONS["kitchen"]
    assert dict(kitchen.eval_kwargs) == {"remove_task_when_completed": True, "terminate_on_tasks_completed": True,
                                         "max_episode_steps": 280}
    assert kitchen.obs_keys == ("observation",) and kitchen.ref == (0.0, 4.0)
    env = gym.make("FrankaKitchen-v1", tasks_to_complete=["microwave", "kettle"], **dict(kitchen.eval_kwargs))
    obs, _ = env.reset(seed=0)
    assert env.spec.max_episode_steps == 280 and ofql_data.flatten_obs(obs, kitchen.obs_keys).shape == (59,)


def test_minari_regeneration_trains_by_its_id_combined_as_the_data_docs_say():
    """docs/data.md: Minari's MuJoCo data by id, a medium-expert combined with `minari combine` (its CLI's API)."""
    import minari

    medium = make_hopper_dataset("mujoco/hopper/medium-v0", episodes=2)
    expert = make_hopper_dataset("mujoco/hopper/expert-v0", episodes=3)
    from minari.storage import get_dataset_path
    get_dataset_path("mujoco-combined/hopper/medium-expert-v0").parent.mkdir(parents=True, exist_ok=True)
    minari.combine_datasets([medium, expert], "mujoco-combined/hopper/medium-expert-v0")
    task, data = ofql.load_task("mujoco-combined/hopper/medium-expert-v0")
    assert len(data["obs"]) == medium.total_steps + expert.total_steps
    assert "d4rl" not in task.ref_source


# ------------------------------------------------------------------------------------------------
# OGBench single-task datasets (optional: requirements-ogbench.txt, which .ci/run installs)
# ------------------------------------------------------------------------------------------------
needs_ogbench = pytest.mark.skipif(importlib.util.find_spec("ogbench") is None,
                                   reason="OGBench is optional: pip install -r requirements-ogbench.txt")
ANTMAZE_OG = "ogbench/antmaze-large-navigate-singletask-v0"
CUBE_OG = "ogbench/cube-single-play-singletask-task1-v0"


def no_ogbench_downloads(monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def write_ogbench_dataset(name: str, lengths: tuple[int, ...], success_rows: tuple[int, ...], seed: int = 0):
    """Trajectories in OGBench's npz layout under OGBENCH_DATASET_DIR: every state of a trajectory, the last one
    with terminals = 1 (its action unused), plus qpos/qvel, from which ogbench relabels single-task rewards; rows
    in `success_rows` put the ant (maze) or the cube (cube) on the task's goal, the others 10 away from it.
    Returns the arrays written (the validation file holds the last trajectory only)."""
    task, _ = ofql.load_task(name, with_data=False)
    env = task.make_env()
    env.reset(seed=0)  # sets the task's goal, as ogbench's relabelling does
    if "maze" in name:
        columns, goal, nq = slice(0, 2), np.asarray(env.unwrapped.cur_goal_xy), env.unwrapped.model.nq
    else:
        columns, goal, nq = slice(14, 17), env.unwrapped._data.mocap_pos[0].copy(), env.unwrapped._model.nq
    n, rng = sum(lengths), np.random.default_rng(seed)
    qpos = rng.normal(size=(n, nq))
    qpos[:, columns] = goal + 10.0
    qpos[list(success_rows), columns] = goal
    arrays = {"observations": rng.normal(size=(n, task.obs_dim)).astype(np.float32),
              "actions": rng.uniform(-1, 1, size=(n, task.act_dim)).astype(np.float32),
              "terminals": np.zeros(n, np.float32), "qpos": qpos, "qvel": rng.normal(size=(n, nq - 1))}
    arrays["terminals"][np.cumsum(lengths) - 1] = 1.0
    parts = name.removeprefix("ogbench/").split("-")
    stem = "-".join(parts[:parts.index("singletask")] + parts[-1:])  # cube-single-play-v0: no singletask/taskN
    folder = Path(os.environ["OGBENCH_DATASET_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{stem}.npz", **arrays)
    np.savez(folder / f"{stem}-val.npz", **{k: v[-lengths[-1]:] for k, v in arrays.items()})
    return arrays


@needs_ogbench
@pytest.mark.parametrize("name", [CUBE_OG, ANTMAZE_OG])
def test_ogbench_dataset_loads_with_its_masks_rewards_and_trajectory_ends(name, monkeypatch):
    no_ogbench_downloads(monkeypatch)
    written = write_ogbench_dataset(name, lengths=(6, 5), success_rows=(2, 5, 8))
    task, data = ofql.load_task(name)
    kept = np.array([0, 1, 2, 3, 4, 6, 7, 8, 9])  # every state but each trajectory's last (terminals = 1)
    np.testing.assert_array_equal(data["obs"], written["observations"][kept])
    np.testing.assert_array_equal(data["next_obs"], written["observations"][kept + 1])  # row 4 -> 5, never 6
    np.testing.assert_array_equal(data["action"], written["actions"][kept])
    # OGBench: success of the current state; mask 0 there only, reward success - 1 (one cube, or the maze goal).
    # The trajectory ends (rows 4 and 9) bootstrap, and row 5 (a last state on the goal) is no transition's state.
    np.testing.assert_array_equal(data["mask"], [1, 1, 0, 1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(data["reward"], [-1, -1, 0, -1, -1, -1, -1, 0, -1])
    assert (task.obs_dim, task.act_dim) == ((28, 5) if "cube" in name else (29, 8))
    assert task.score_key == "success" and "success rate" in task.ref_source


@needs_ogbench
def test_ogbench_trains_briefly_and_scores_success_at_episode_end_not_return(tmp_path, monkeypatch):
    no_ogbench_downloads(monkeypatch)
    write_ogbench_dataset(ANTMAZE_OG, lengths=(20, 20), success_rows=(5, 30))
    summary = ofql.train(ofql.Args(env=ANTMAZE_OG, out_dir=str(tmp_path), total_steps=30, eval_every=30,
                                   eval_episodes=2, batch_size=16, hidden_dim=16, log_every=10))
    assert (summary["args"]["gamma"], summary["args"]["eval_protocol"]) == (0.99, "paper")  # FQL's gamma on antmaze-large
    last = summary["history"][-1]
    # 1000 steps at reward -1, never at the goal: success 0, not a score of the return (100 x -1000)
    assert (last["score_mean"], last["return_mean"]) == (0.0, -1000.0) and "success" in last["ref_source"]
    agent, task, normalizer, args = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"))

    class GoalEverywhereAtStep4(gym.Wrapper):  # success (computed before the step) at step 4, which then terminates
        steps = 0

        def step(self, action):
            self.steps += 1
            if self.steps == 4:
                self.env.unwrapped._goal_tol = 1e3
            return self.env.step(action)

    make_env, made = task.make_env, []

    def second_episode_reaches_the_goal(**kwargs):
        made.append(GoalEverywhereAtStep4(make_env(**kwargs)) if made else make_env(**kwargs))
        return made[-1]

    task = dataclasses.replace(task, make_env=second_episode_reaches_the_goal)
    result = ofql.evaluate(agent, task, normalizer, args, episodes=2, seed=0)
    assert result["scores"] == [0.0, 100.0] and result["score_mean"] == 50.0
    assert result["return_mean"] == -501.5  # (-1000 - 3) / 2
    assert ofql.Args(env="ogbench/humanoidmaze-medium-navigate-singletask-v0").resolved().gamma == 0.995


@needs_ogbench
def test_ogbench_missing_dataset_offline_says_where_and_how(monkeypatch):
    no_ogbench_downloads(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"cube-single-play-v0 \(cube-single-play-v0.npz and cube-single-play-"
                       r"v0-val.npz\) is not in OGBENCH_DATASET_DIR=.*network unreachable.*download_datasets"):
        ofql.load_task(CUBE_OG)
    with pytest.raises(ValueError, match="not an OGBench state-based single-task dataset"):
        ofql.load_task("ogbench/cube-single-play-v0")
    with pytest.raises(ValueError, match="Did you mean: `cube-single-singletask`"):
        ofql.load_task("ogbench/cube-sinle-play-singletask-v0")


@needs_ogbench
def test_ogbench_cli_offline_is_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env.update(https_proxy="http://127.0.0.1:9", OGBENCH_DATASET_DIR=str(tmp_path))  # a closed port: offline
    result = subprocess.run([sys.executable, "ofql.py", "--env", ANTMAZE_OG, "--out-dir", str(tmp_path)], env=env,
                            capture_output=True, text=True, cwd=os.path.dirname(ofql.__file__), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: OGBench dataset antmaze-large-navigate-v0 ")
    # the command of older versions answers with ofql.py's (ogbench_tasks.py is a leaf: it never imports ofql.py)
    old = subprocess.run([sys.executable, "ogbench_tasks.py", "--env", ANTMAZE_OG, "--eval-episodes", "50"], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(ofql.__file__), timeout=120)
    assert old.returncode == 1 and old.stderr.strip() == (
        f"error: OGBench datasets train through ofql.py: python ofql.py --env {ANTMAZE_OG} --eval-episodes 50 "
        "(every flag as before; regenerate data with python ogbench_tasks.py generate <dataset>)")


@needs_ogbench
@pytest.mark.parametrize("dataset, obs_dim, qpos_dim, button_states", [
    ("cube-single-play-v0", 28, 21, None), ("scene-noisy-v0", 40, 25, 2), ("puzzle-3x3-play-v0", 55, 23, 9)])
def test_generate_writes_ogbench_files_that_ogbench_and_ofql_read(dataset, obs_dim, qpos_dim, button_states,
                                                                     tmp_path, monkeypatch):
    """A tiny regenerated dataset (5 + 1 episodes of 12 steps): OGBench's keys, dtypes and train/validation split, the
    oracle's actions in [-1, 1] and moving the arm; ogbench's own loader and a few OFQL gradient steps read it."""
    import ogbench
    import ogbench_tasks

    no_ogbench_downloads(monkeypatch)
    args = ogbench_tasks.GenerateArgs(dataset, episodes=5, episode_steps=12, out_dir=str(tmp_path / "og"))
    train_path, val_path = ogbench_tasks.generate(args)
    train, val = dict(np.load(train_path)), dict(np.load(val_path))
    assert (len(train["observations"]), len(val["observations"])) == (60, 12)
    expected = {"observations": (np.float32, obs_dim), "actions": (np.float32, 5), "terminals": (np.bool_, None),
                "qpos": (np.float32, qpos_dim), "qvel": (np.float32, None)}
    if button_states:
        expected["button_states"] = (np.int64, button_states)
    assert set(train) == set(val) == set(expected)
    for key, (dtype, width) in expected.items():
        assert train[key].dtype == dtype and (width is None or train[key].shape[1] == width), key
    np.testing.assert_array_equal(np.flatnonzero(train["terminals"]), np.arange(11, 60, 12))  # each episode's end
    assert np.abs(train["actions"]).max() <= 1 and np.abs(np.diff(train["qpos"][:12, :6], axis=0)).max() > 1e-3
    assert not (tmp_path / "og" / f".{dataset}-chunks").exists()  # chunks removed once both files exist
    stem = dataset.removesuffix("-v0")
    name = f"{stem}-singletask-v0"
    _, data, _ = ogbench.make_env_and_datasets(name, dataset_dir=str(tmp_path / "og"))
    assert len(data["observations"]) == 55  # 11 transitions per 12-state episode
    monkeypatch.setenv("OGBENCH_DATASET_DIR", str(tmp_path / "og"))
    if dataset.startswith("cube"):  # one family trains (each loads through the same code as above)
        summary = ofql.train(ofql.Args(env=f"ogbench/{name}", out_dir=str(tmp_path / "runs"), total_steps=20,
                                       eval_every=20, eval_episodes=1, batch_size=8, hidden_dim=16, log_every=10))
        assert summary["history"][-1]["step"] == 20 and summary["history"][-1]["score_mean"] in (0.0, 100.0)


@needs_ogbench
def test_generate_is_seeded_worker_independent_and_resumes_without_redoing_chunks(tmp_path, monkeypatch):
    import ogbench_tasks

    def files(folder, seed=0, workers=1):
        paths = ogbench_tasks.generate(ogbench_tasks.GenerateArgs(
            "cube-double-noisy-v0", seed=seed, workers=workers, episodes=20, episode_steps=6, out_dir=str(folder)))
        return [p.read_bytes() for p in paths]

    one_worker = files(tmp_path / "a")
    assert files(tmp_path / "b", workers=2) == one_worker  # byte-identical whatever the split over processes
    assert files(tmp_path / "c", seed=1)[0] != one_worker[0]
    # A killed generation: chunks 0 and 2 of 3 already written. Only chunk 1 is made again, and the files match.
    work = tmp_path / "d" / ".cube-double-noisy-v0-chunks"
    work.mkdir(parents=True)
    made = []
    real = ogbench_tasks.generate_chunk
    for chunk in (0, 2):
        real(ogbench_tasks.Recipe.of("cube-double-noisy-v0"), 0, chunk, (10, 10, 2)[chunk], 6,
             work / f"chunk-{chunk:05d}.npz")
    monkeypatch.setattr(ogbench_tasks, "generate_chunk", lambda *job: made.append(job[2]) or real(*job))
    assert files(tmp_path / "d") == one_worker and made == [1]
    monkeypatch.setattr(ogbench_tasks, "generate_chunk", real)
    (tmp_path / "e" / ".cube-double-noisy-v0-chunks").mkdir(parents=True)
    (tmp_path / "e" / ".cube-double-noisy-v0-chunks" / "manifest.json").write_text('{"seed": 7}')
    with pytest.raises(ValueError, match="holds chunks of another generation.*delete that folder"):
        files(tmp_path / "e")
    with pytest.raises(ValueError, match="cannot generate 'cube-single-play'.*did you mean cube-single-play-v0"):
        ogbench_tasks.Recipe.of("cube-single-play")


def test_generation_recipes_follow_ogbench_commands():
    """OGBench's commands.sh: episode counts, oracle kind and random-action probability per dataset."""
    import ogbench_tasks

    recipe = ogbench_tasks.Recipe.of
    assert recipe("cube-single-play-v0") == ogbench_tasks.Recipe("cube-single-play-v0", "cube-single-v0", "plan",
                                                                 1000, 0.0)
    assert (recipe("cube-quadruple-noisy-v0").train_episodes, recipe("cube-quadruple-noisy-v0").p_random_action) == \
        (5000, 0.1)
    assert (recipe("puzzle-4x5-noisy-v0").train_episodes, recipe("puzzle-4x5-noisy-v0").p_random_action) == (3000, 0.2)
    assert (recipe("puzzle-4x6-play-v0").oracle, recipe("cube-triple-play-v0").train_episodes) == ("plan", 3000)
    assert recipe("scene-noisy-v0").env_id == "scene-v0"
    healthy = np.zeros((5, 25))
    healthy[:, 16] = 0.02
    assert ogbench_tasks.scene_episode_is_healthy(healthy)
    for y, z in ((0.29, 0.02), (-0.31, 0.02), (-0.31, 0.09)):  # too far right; too far left outside the drawer
        bad = healthy.copy()
        bad[3, 15:17] = y, z
        assert not ogbench_tasks.scene_episode_is_healthy(bad)
    in_drawer = healthy.copy()
    in_drawer[3, 15:17] = -0.31, 0.07
    assert ogbench_tasks.scene_episode_is_healthy(in_drawer)


def test_preset_paper_resolves_as_the_table_says():
    """--preset paper: every field of docs/algorithm.md's four-task table, as Args(env, preset="paper").resolved()."""
    text = (Path(__file__).parent / "docs" / "algorithm.md").read_text()
    header = "| field | hopper-medium-v2 | walker2d-medium-replay-v2 | antmaze-medium-play-v0 | kitchen-partial-v0 |"
    rows = text.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    tasks = header.strip("| ").split(" | ")[1:]
    resolved = {task: ofql.Args(env=task, preset="paper").resolved() for task in tasks}
    assert len(rows) >= 20
    for row in rows:
        field, *values = [cell.strip(" `") for cell in row.strip("|").split("|")]
        for task, value in zip(tasks, values):
            want = {"True": True, "False": False}.get(value, value)
            got = getattr(resolved[task], field)
            assert got == (type(got)(want) if isinstance(got, (int, float)) and not isinstance(got, bool) else want), (
                task, field, got, value)
    with pytest.raises(ValueError, match="--preset paper is for D4RL's MuJoCo, AntMaze and Kitchen tasks .* bandit task"):
        ofql.Args(env="bandit-8modes", preset="paper").resolved()


@pytest.mark.parametrize("name,family,fields", [
    ("hopper-medium-v2", "mujoco", {"eta": 0.1, "gamma": 0.995, "grad_norm": 9, "eval_protocol": "argmax"}),
    ("walker2d-medium-v2", "mujoco", {"grad_norm": 1, "critic_layer_norm": True}),
    ("antmaze-large-play-v0", "antmaze", {"eta": 4.5, "max_q_backup": True, "reward_scale": 4.0, "gamma": 0.99}),
    ("D4RL/antmaze/large-play-v1", "antmaze", {"eta": 4.5, "grad_norm": 10, "max_q_backup": True, "reward_bias": -0.5,
                                               "eval_protocol": "paper"}),
    ("D4RL/antmaze/umaze-v1", "antmaze", {"eta": 0.5, "max_q_backup": False, "reward_scale": 4.0}),
    ("D4RL/antmaze/medium-play-v1", "antmaze", {"eta": 2.0, "lr": 1e-3}),
    ("/data/minari/D4RL/antmaze/medium-diverse-v1", "antmaze", {"eta": 3.0, "grad_norm": 1}),  # a dataset folder
    ("kitchen-mixed-v0", "kitchen", {"eta": 0.005, "grad_norm": 10, "eval_protocol": "paper"}),
    ("D4RL/kitchen/complete-v2", "kitchen", {"eta": 0.005, "grad_norm": 9, "total_steps": 250_000, "gamma": 0.99}),
    ("mujoco/hopper/medium-v0", "mujoco", {"eta": 0.1, "gamma": 0.995, "tau": 0.02, "eval_protocol": "argmax"}),
    ("standin/hopper/medium-expert-v0", "mujoco", {"eta": 0.1, "critic_layer_norm": True}),
    ("ogbench/cube-single-play-singletask-v0", "ogbench", {"gamma": 0.99, "eval_protocol": "paper", "eta": 0.1}),
    ("ogbench/humanoidmaze-medium-navigate-singletask-v0", "ogbench", {"gamma": 0.995, "critic_layer_norm": True}),
    ("bandit-8modes", "bandit", {"eta": 0.3, "lr_decay": False, "eval_protocol": "one", "eval_episodes": 1000}),
    ("pendulum-swingup", "pendulum", {"eta": 3.0, "total_steps": 6000, "eval_protocol": "deterministic"}),
    ("my-robot", "mujoco", {"eta": 0.1, "gamma": 0.995, "eval_protocol": "argmax"}),  # your own data's name
])
def test_every_task_family_resolves_its_preset(name, family, fields):
    """Each family's preset, Minari's D4RL/antmaze and D4RL/kitchen ids included (they took MuJoCo's before)."""
    assert ofql.data_module(name).task_settings(name)[0] == family
    args = ofql.Args(env=name).resolved()
    assert {key: getattr(args, key) for key in fields} == fields


def test_a_missing_data_module_names_itself_and_the_in_memory_entry(monkeypatch):
    """Without ogbench_tasks.py (or ofql_data.py) next to ofql.py, a task name of that family says which file it loads
    through. The OGBench preset: FQL's critic and discount, the paper's selection, the MuJoCo eta
    (ogbench_tasks.task_settings)."""
    preset = ofql.Args(env=CUBE_OG).resolved()
    assert (preset.gamma, preset.critic_layer_norm, preset.eval_protocol, preset.eta) == (0.99, True, "paper", 0.1)
    assert ofql.Args(env=CUBE_OG, eta=0.3).resolved().eta == 0.3  # a flag still wins over the preset
    assert ofql.Args(env="ogbench/antmaze-giant-navigate-singletask-v0").resolved().gamma == 0.995
    monkeypatch.setitem(sys.modules, "ogbench_tasks", None)  # `import ogbench_tasks` fails, as where it is absent
    with pytest.raises(ValueError, match="--env " + CUBE_OG + " loads through ogbench_tasks.py, which is not next to "
                       "ofql.py.*ofql.train\\(args, data=...\\)"):
        ofql.load_task(CUBE_OG)
    monkeypatch.setitem(sys.modules, "ofql_data", None)
    with pytest.raises(ValueError, match="--env pendulum-swingup loads through ofql_data.py"):
        ofql.load_task("pendulum-swingup")


def test_ogbench_without_the_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ogbench", None)  # `import ogbench` fails, as where it is not installed
    with pytest.raises(ValueError, match="needs the optional ogbench package.*pip install -r requirements-ogbench.txt"):
        ofql.load_task(CUBE_OG)


# ------------------------------------------------------------------------------------------------
# sweep.py: Ray sweeps over tasks x seeds x grids, resume, report (issue #8)
# ------------------------------------------------------------------------------------------------
SWEEP_FLAGS = ["--env", "bandit-8modes", "--seeds", "0", "1", "--grid", "eta=0.1,0.3", "--total-steps", "200",
               "--eval-every", "100", "--save-every", "50", "--eval-episodes", "1", "--hidden-dim", "32",
               "--num-cpus", "2"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One embedded-Ray sweep, 2 seeds x 2 grid points on the bandit, in which the first run to write a
    checkpoint has its worker die once (the test hook of sweep.py)."""
    import sweep

    out = tmp_path_factory.mktemp("sweep") / "s"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(sweep.KILL_HOOK_ENV, str(out.parent / "killed-once"))
        code = sweep.main(SWEEP_FLAGS + ["--out", str(out)])
    return out, code


def test_sweep_grid_values_are_typed_and_bad_flags_fail_before_anything_starts(tmp_path):
    import sweep

    points = sweep.parse_grid(["eta=0.01,0.1", "ema-actor=true,false", "max_q_backup=true"], [])
    assert points == [{"eta": 0.01, "ema_actor": True, "max_q_backup": True},
                      {"eta": 0.01, "ema_actor": False, "max_q_backup": True},
                      {"eta": 0.1, "ema_actor": True, "max_q_backup": True},
                      {"eta": 0.1, "ema_actor": False, "max_q_backup": True}]
    assert isinstance(points[0]["eta"], float)
    with pytest.raises(ValueError, match="no field 'etaa'.*eta"):
        sweep.parse_grid(["etaa=0.1"], [])
    with pytest.raises(ValueError, match="also passed to every run"):
        sweep.parse_grid(["eta=0.1"], ["--eta", "0.3"])
    with pytest.raises(ValueError, match="set by sweep.py; use --seeds"):
        sweep.parse_grid(["seed=1,2"], [])
    with pytest.raises(ValueError, match="--seed is set by sweep.py"):
        sweep.ofql_args_from(["--seed", "3"])
    with pytest.raises(SystemExit) as exit_info:  # tyro's message for a typo in an ofql.py flag
        sweep.ofql_args_from(["--total-stepz", "10"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):  # a value of the wrong type in the grid
        sweep.parse_grid(["total_steps=ten"], [])
    with pytest.raises(ValueError, match=re.escape("--eta -1.0 must be a finite number in [0, inf)")):  # before Ray
        sweep.plan_runs(["bandit-8modes"], [0], [{"eta": -1.0}], ofql.Args(), threads=1)
    with pytest.raises(ValueError, match="unknown task 'hoper-medium-v2'; did you mean"):
        sweep.main(["--env", "hoper-medium-v2", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # nothing written
    runs = sweep.plan_runs(["bandit-8modes", "d4rl/hopper/medium-v2"], [0, 1, 0], points[:1], ofql.Args(), threads=1)
    assert len(runs) == 4  # the repeated seed runs once
    assert [r.name for r in runs][:2] == ["bandit-8modes__eta=0.01__ema_actor=True__max_q_backup=True__seed0",
                                          "bandit-8modes__eta=0.01__ema_actor=True__max_q_backup=True__seed1"]
    assert runs[2].name.startswith("d4rl_hopper_medium-v2__") and runs[3].args.seed == 1 and runs[3].args.eta == 0.01


def test_sweep_finishes_every_run_and_reports_means_over_seeds(finished_sweep):
    out, code = finished_sweep
    assert code == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "curves")
    assert names == [f"bandit-8modes__eta={eta}__seed{seed}" for eta in ("0.1", "0.3") for seed in (0, 1)]
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in names}
    assert all(s["steps"] == 200 and [h["step"] for h in s["history"]] == [100, 200] for s in summaries.values())
    assert summaries[names[0]]["args"]["eta"] == 0.1 and summaries[names[3]]["args"]["seed"] == 1
    result = json.loads((out / "report.json").read_text())
    for eta in ("0.1", "0.3"):
        cell = result["tasks"]["bandit-8modes"][f"eta={eta}"]
        finals = [summaries[f"bandit-8modes__eta={eta}__seed{s}"]["final_score"] for s in (0, 1)]
        assert sorted(cell["seeds"]) == [0, 1] and cell["paper"] is None
        assert np.mean(cell["final"]) == pytest.approx(np.mean(finals))
        assert f"| eta={eta} | 2 | {np.mean(finals):.1f} ± {np.std(finals):.1f} |" in (out / "report.md").read_text()
    assert len((out / "report.csv").read_text().strip().splitlines()) == 5
    assert (out / "curves" / "bandit-8modes.png").stat().st_size > 1000
    assert result["problems"] == []


def test_sweep_worker_killed_after_a_checkpoint_is_retried_from_it(finished_sweep, tmp_path):
    """Ray retried the run whose worker died; the retry started at the checkpoint's step, and ends with
    exactly the parameters of a run that was never killed."""
    out, _ = finished_sweep
    attempts = {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
                for p in out.glob("*/attempts.jsonl")}
    killed = [name for name, lines in attempts.items() if len(lines) > 1]
    assert len(killed) == 1, attempts
    first, retry = attempts[killed[0]]
    assert first["start_step"] == 0 and retry["start_step"] == 50, attempts[killed[0]]  # died after its 1st save
    assert first["pid"] != retry["pid"]  # a new worker process
    resumed = json.loads((out / killed[0] / "summary.json").read_text())
    straight = ofql.train(dataclasses.replace(ofql.Args(**resumed["args"]), run_dir=str(tmp_path / "straight")))
    a, b = ofql.load_checkpoint(straight["checkpoint"]), ofql.load_checkpoint(resumed["checkpoint"])
    for key in a["agent"]["actor"]:
        assert torch.equal(a["agent"]["actor"][key], b["agent"]["actor"][key]), key
    assert a["history"] == b["history"]


def test_sweep_restart_skips_finished_runs_and_resumes_unfinished_ones(finished_sweep, capsys):
    import shutil

    import sweep

    out, _ = finished_sweep
    copy = out.parent / "restart"
    shutil.copytree(out, copy)
    assert sweep.main(SWEEP_FLAGS + ["--out", str(copy)]) == 0  # all finished: Ray is not even started
    assert "4 runs, 4 already finished" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other ofql.py flags.*total_steps"):
        sweep.main(SWEEP_FLAGS[:-2] + ["--total-steps", "300", "--out", str(copy)])
    # an unfinished run (its summary lost): the next attempt resumes at the last checkpoint, not at 0
    run_dir = copy / "bandit-8modes__eta=0.3__seed1"
    before = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()
    args = sweep.plan_runs(["bandit-8modes"], [1], [{"eta": 0.3}], sweep.ofql_args_from(SWEEP_FLAGS[7:-2]), 1)[0].args
    assert sweep.run_one(str(run_dir), args) == {"status": "done", "run_dir": str(run_dir)}
    assert json.loads((run_dir / "attempts.jsonl").read_text().splitlines()[-1])["start_step"] == 200
    assert json.loads((run_dir / "summary.json").read_text())["history"] == before["history"]


def test_sweep_interrupted_with_ctrl_c_resumes_its_run_when_restarted(tmp_path):
    """The driver gets SIGINT while its run is past a checkpoint; every later start of the same command goes
    on from the last checkpoint instead of from scratch, and a worker death with no retry left is reported."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import sweep

    out = tmp_path / "s"
    flags = ["--env", "bandit-8modes", "--total-steps", "600", "--eval-every", "300", "--save-every", "50",
             "--hidden-dim", "32", "--num-cpus", "1", "--out", str(out)]
    # a shell's background job (`.ci/run &`) starts with SIGINT ignored, which the child would inherit
    proc = subprocess.Popen([sys.executable, "sweep.py", *flags], cwd=os.path.dirname(ofql.__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint, deadline = out / "bandit-8modes__seed0" / "checkpoint.pt", time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert checkpoint.exists(), "the sweep wrote no checkpoint in 300 s (or exited first)"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 1 and "interrupted: run the same command again" in err
    assert not (out / "bandit-8modes__seed0" / "summary.json").exists()
    # a restart whose worker dies again with no retry left: the run is reported failed, nothing hangs
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(sweep.KILL_HOOK_ENV, str(tmp_path / "killed-once"))
        assert sweep.main(flags + ["--max-retries", "0"]) == 1
    assert "after 0 retries" in (out / "bandit-8modes__seed0" / "error.txt").read_text()
    assert "bandit-8modes__seed0: failed: " in (out / "report.md").read_text()
    assert sweep.main(flags) == 0
    attempts = [json.loads(line) for line in (out / "bandit-8modes__seed0" / "attempts.jsonl").read_text().splitlines()]
    steps = [a["start_step"] for a in attempts]
    assert len(steps) == 3 and 0 == steps[0] < steps[1] < steps[2] < 600, steps  # each restart went on from a checkpoint
    assert json.loads((out / "bandit-8modes__seed0" / "summary.json").read_text())["steps"] == 600
    assert not (out / "bandit-8modes__seed0" / "error.txt").exists()


def test_sweep_report_names_missing_and_corrupt_runs_and_reports_the_rest(finished_sweep, capsys):
    import shutil

    import sweep

    out, _ = finished_sweep
    copy = out.parent / "damaged"
    shutil.copytree(out, copy)
    (copy / "bandit-8modes__eta=0.1__seed0" / "summary.json").write_text('{"env": "bandit-8m')  # truncated
    shutil.rmtree(copy / "bandit-8modes__eta=0.3__seed1")
    assert sweep.main(["--report", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "bandit-8modes__eta=0.1__seed0: corrupt summary.json" in text
    assert "bandit-8modes__eta=0.3__seed1: missing (planned, no run folder)" in text
    result = json.loads((copy / "report.json").read_text())
    assert result["tasks"]["bandit-8modes"]["eta=0.1"]["seeds"] == [1]
    assert result["tasks"]["bandit-8modes"]["eta=0.3"]["seeds"] == [0]
    with pytest.raises(ValueError, match="is not a folder"):
        sweep.report(copy / "nope")


def test_sweep_report_puts_paper_numbers_and_domain_averages_beside_d4rl_tasks(tmp_path):
    """Fabricated finished runs of two D4RL tasks: the table shows the paper's number, and the MuJoCo
    average is the mean of the per-task means over the tasks present."""
    import sweep

    (tmp_path / "sweep.json").write_text(json.dumps({"ofql_args": {}, "runs": []}))
    for task, grid, seed, scores in (("hopper-medium-v2", {}, 0, [50, 60, 70]), ("hopper-medium-v2", {}, 1, [40, 50, 90]),
                                     ("walker2d-medium-v2", {}, 0, [10, 20, 30]),
                                     ("hopper-medium-v2", {"eta": 0.3}, 0, [0, 0, 100])):
        run_dir = tmp_path / f"{task}__{grid}__seed{seed}"
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps({"task": task, "seed": seed, "grid": grid}))
        history = [{"step": 1000 * (i + 1), "score_mean": s} for i, s in enumerate(scores)]
        (run_dir / "summary.json").write_text(json.dumps({"history": history, "steps": 3000, "wall_time_s": 1.0,
                                                          "args": {"mujoco_data": "d4rl"}}))
    result = sweep.report(tmp_path, last_k=2)
    text = (tmp_path / "report.md").read_text()
    assert "| preset | 2 | 80.0 ± 10.0 | 67.5 ± 2.5 | 103.6 |" in text  # last: 70, 90; last 2: 65, 70
    assert "| MuJoCo | preset | 2/9 | 55.0 | 92.5 |" in text  # (80 + 30) / 2
    assert "| MuJoCo | eta=0.3 | 1/9 | 100.0 | 92.5 |" in text
    assert "| MuJoCo | best per task * | 2/9 | 65.0 | 92.5 |" in text  # (100 + 30) / 2
    assert result["tasks"]["walker2d-medium-v2"]["preset"]["paper"] == 87.4


def test_sweep_run_trains_a_baseline_policy(tmp_path):
    """sweep.py hands ofql.train baselines.py's BaselineArgs: a --policy flow run finishes as a flow run, and
    `--grid policy=...` sweeps the policy classes."""
    import sweep

    assert sweep.parse_grid(["policy=diffusion,flow"], []) == [{"policy": "diffusion"}, {"policy": "flow"}]
    args = baselines.BaselineArgs(env="bandit-8modes", policy="flow", total_steps=2, eval_every=2, hidden_dim=8)
    assert sweep.run_one(str(tmp_path / "run"), args)["status"] == "done"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["args"]["policy"] == "flow"


def test_run_dir_is_used_exactly_and_an_existing_run_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "exact" / "run"
    summary = ofql.train(ofql.Args(env="bandit-8modes", run_dir=str(run_dir), total_steps=2, eval_every=2,
                                   hidden_dim=32))
    assert summary["run_dir"] == str(run_dir) and (run_dir / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        ofql.train(ofql.Args(env="bandit-8modes", run_dir=str(run_dir), total_steps=2, eval_every=2, hidden_dim=32))


# ------------------------------------------------------------------------------------------------
# kernels.py: fused Triton kernels against their torch references (Triton's CPU interpreter here, set in
# conftest.py; the real kernels where a GPU is present), and what their GPU builds prove (no GPU needed)
# ------------------------------------------------------------------------------------------------
KERNEL_DEVICE = "cpu" if kernels.INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(kernels.triton_unusable_reason(KERNEL_DEVICE) is not None,
                                  reason=f"Triton kernels cannot run: {kernels.triton_unusable_reason(KERNEL_DEVICE)}")
# (batch, obs dim, act dim, hidden): batches 1 / 7 (one-row fp32 blocks), 33 / 257 (16-row tiles, a ragged one),
# 2049 (64-row tiles, ragged); every D4RL obs size class and action size; hidden 256 and widths that are not
# powers of two
KERNEL_CASES = [(1, 59, 9, 256), (7, 17, 6, 256), (257, 29, 8, 256), (33, 29, 8, 48), (2049, 11, 3, 40)]
# the tensor-core precisions are checked where tiles are >= 16 rows (below, the kernels use fp32 FMA)
PRECISION_CASES = [(33, 29, 8, 48), (2049, 11, 3, 40)]
REL_TOL = kernels.TOLERANCE["ieee"]  # fp32 sums of <= 300 products through 4 layers: ~1e-6 measured


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def random_actor(obs_dim: int, act_dim: int, hidden: int, seed: int, precision: str = "ieee") -> ofql.MeanFlowActor:
    """Fresh weights, with biases large enough that every padding/masking mistake shows."""
    torch.manual_seed(seed)
    actor = ofql.MeanFlowActor(obs_dim, act_dim, hidden, time_scale=3.0)
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    actor.precision = precision
    return actor.to(KERNEL_DEVICE)


def kernel_inputs(batch: int, obs_dim: int, act_dim: int, seed: int = 0):
    """(z, r, t, obs, v): half the rows with r = t, as the flow-ratio rows of training."""
    gen = torch.Generator().manual_seed(seed)
    z, v = torch.randn(batch, act_dim, generator=gen), torch.randn(batch, act_dim, generator=gen)
    obs, t = torch.randn(batch, obs_dim, generator=gen), torch.rand(batch, generator=gen)
    r = torch.where(torch.arange(batch) % 2 == 0, t, t * torch.rand(batch, generator=gen))
    return tuple(x.to(KERNEL_DEVICE) for x in (z, r, t, obs, v))


def raw_tensors(actor: ofql.MeanFlowActor) -> list[torch.Tensor]:
    """The actor's 18 tensors in kernels' order (freqs, W1, b1, W2, b2 of emb_r and emb_t; W, b of the net)."""
    def emb(e):
        return [e.freqs, e.mlp[0].weight, e.mlp[0].bias, e.mlp[2].weight, e.mlp[2].bias]
    return [p.detach() for p in emb(actor.emb_r) + emb(actor.emb_t) + [p for m in actor.net[::2] for p in m.parameters()]]


def nans(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=KERNEL_DEVICE)


@pytest.mark.parametrize("batch,obs_dim,act_dim,hidden", KERNEL_CASES[:4])
def test_kernel_references_match_ofql_modules(batch, obs_dim, act_dim, hidden):
    """kernels.py's plain-torch references over raw tensors are the contract ofql.py's modules must meet (fp32):
    u and du/dt (torch.func.jvp, tangents (v, 0, 1)), act, the folded actor, the time embedding and its tangent."""
    actor = random_actor(obs_dim, act_dim, hidden, seed=batch).cpu()
    z, r, t, obs, v = (x.cpu() for x in kernel_inputs(batch, obs_dim, act_dim))
    tensors = raw_tensors(actor)
    u_ref, dudt_ref = kernels.velocity_reference(tensors, z, r, t, obs, v)
    u, dudt = torch.func.jvp(lambda z_, r_, t_: actor(z_, r_, t_, obs), (z, r, t),
                             (v, torch.zeros_like(r), torch.ones_like(t)))
    folded = ofql_eval.fold(actor)
    with torch.no_grad():
        errors = {"u": relative_error(u, u_ref), "du/dt": relative_error(dudt, dudt_ref),
                  "act": relative_error(actor.act(obs, z), kernels.act_reference(tensors, obs, z)),
                  "folded": relative_error(folded(obs, z), kernels.folded_actor_reference(
                      z, obs, *[p for m in folded.linears for p in (m.weight, m.bias)])),
                  "emb": relative_error(actor.emb_t(t), kernels.time_embedding_reference(t, *tensors[5:10])),
                  "d emb": relative_error(actor.emb_t.forward_with_tangent(t)[1],
                                          kernels.time_embedding_reference(t, *tensors[5:10], with_tangent=True)[1])}
    print(f"modules vs references {batch}x{obs_dim}->{act_dim} (hidden {hidden}): "
          + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert max(errors.values()) <= REL_TOL


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tolerance_rule_per_precision_bounds_the_rounded_products(precision):
    """The documented rule TOLERANCE[p] (16 unit roundoffs of the operand format) bounds the error of u, du/dt and
    actions when every product's operands are rounded as the tensor cores round them (the references' `precision`,
    also what the interpreted kernels emulate), on random actors of every test shape; and the rounding is real
    (the error is well above fp32's), so a kernel that ignored the precision would not look like one that uses it."""
    worst = 0.0
    for i, (batch, obs_dim, act_dim, hidden) in enumerate(KERNEL_CASES):
        actor = random_actor(obs_dim, act_dim, hidden, seed=100 + i).cpu()
        z, r, t, obs, v = (x.cpu() for x in kernel_inputs(batch, obs_dim, act_dim, seed=i))
        tensors = raw_tensors(actor)
        exact = kernels.velocity_reference(tensors, z, r, t, obs, v) + (kernels.act_reference(tensors, obs, z),)
        rounded = kernels.velocity_reference(tensors, z, r, t, obs, v, precision) + \
            (kernels.act_reference(tensors, obs, z, precision),)
        errors = [relative_error(a, b) for a, b in zip(rounded, exact)]
        worst = max(worst, *errors)
        print(f"{precision} {batch}x{obs_dim}->{act_dim} (hidden {hidden}): u {errors[0]:.1e}, du/dt {errors[1]:.1e}, "
              f"act {errors[2]:.1e}; in unit roundoffs: {max(errors) / kernels.UNIT_ROUNDOFF[precision]:.1f}")
        assert max(errors) <= kernels.TOLERANCE[precision]
        assert min(errors[:2]) > 10 * kernels.TOLERANCE["ieee"]
    print(f"{precision}: worst {worst:.1e} = {worst / kernels.UNIT_ROUNDOFF[precision]:.1f} unit roundoffs, "
          f"tolerance {kernels.TOLERANCE[precision]:.1e}")


@needs_triton
@pytest.mark.parametrize("batch,obs_dim,act_dim,hidden,precision",
                         [case + ("ieee",) for case in KERNEL_CASES[:4]]  # ieee keeps 16-row tiles at 2049
                         + [case + (p,) for case in PRECISION_CASES for p in ("tf32", "bf16")])
def test_triton_velocity_and_dudt_and_act_match_references(batch, obs_dim, act_dim, hidden, precision):
    """u and du/dt (one launch), u alone, and act (the folded kernel with r = 0, t = 1 folded in-kernel) against
    the fp32 reference within TOLERANCE[precision]; outputs pre-filled with NaN (every element written)."""
    actor = random_actor(obs_dim, act_dim, hidden, seed=1000 + batch + obs_dim, precision=precision)
    weights = kernels.actor_weights(actor)
    z, r, t, obs, v = kernel_inputs(batch, obs_dim, act_dim)
    u, dudt = kernels.velocity(weights, z, r, t, obs, v, out=(nans(batch, act_dim), nans(batch, act_dim)))
    u_only, none = kernels.velocity(weights, z, r, t, obs)
    action = kernels.act(weights, obs, z, out=nans(batch, act_dim))
    tensors = raw_tensors(actor)
    u_ref, dudt_ref = kernels.velocity_reference(tensors, z, r, t, obs, v)
    errors = {"u": relative_error(u, u_ref), "du/dt": relative_error(dudt, dudt_ref),
              "u alone": relative_error(u_only, u_ref), "act": relative_error(action, kernels.act_reference(tensors, obs, z))}
    print(f"{precision} {batch}x{obs_dim}->{act_dim} (hidden {hidden}, block {kernels.launch_config(batch, precision).block_b} "
          f"rows): max relative errors " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert none is None and not any(x.isnan().any() for x in (u, dudt, action))
    assert max(errors.values()) <= kernels.TOLERANCE[precision] and action.abs().max() <= 1.0
    if precision != "ieee":  # the precision reaches the products (tensor cores / their emulation round the inputs)
        assert errors["u"] > kernels.TOLERANCE["ieee"]


@needs_triton
@pytest.mark.parametrize("batch,obs_dim,act_dim,hidden", [(5, 17, 6, 32), (33, 29, 8, 48)])
def test_triton_velocity_jvp_gradients_match_torch(batch, obs_dim, act_dim, hidden):
    """Training's path: u from the kernel carries the gradients of every actor parameter (and of z, r, t, obs)
    through the saved activations, as the torch path's; du/dt carries none."""
    actor = random_actor(obs_dim, act_dim, hidden, seed=7)
    z, r, t, obs, v = kernel_inputs(batch, obs_dim, act_dim, seed=3)
    weight = torch.randn(batch, act_dim, device=KERNEL_DEVICE)
    grads = {}
    for backend in ("triton", "torch"):
        actor.backend = backend
        inputs = [x.clone().requires_grad_() for x in (z, r, t, obs)]
        u, dudt = actor.velocity_and_dudt(*inputs, v)
        assert u.requires_grad and not dudt.requires_grad
        grads[backend] = torch.autograd.grad((u * weight).sum(), [*actor.parameters(), *inputs])
        grads[backend + " dudt"] = dudt
    errors = [relative_error(a, b) for a, b in zip(grads["triton"], grads["torch"])]
    print(f"gradients {batch}x{obs_dim}->{act_dim} (hidden {hidden}): max relative error {max(errors):.1e} "
          f"(parameters {max(errors[:-4]):.1e}, z r t obs {max(errors[-4:]):.1e})")
    assert max(errors) <= 10 * REL_TOL and relative_error(grads["triton dudt"], grads["torch dudt"]) <= REL_TOL


@needs_triton
def test_kernel_weight_set_is_validated_once_and_follows_the_actor(monkeypatch):
    """Nothing but the launch on the hot path: the weights are validated when the weight set is built, not per call;
    in-place updates (optimiser steps) show without a rebuild; .to() and a precision change rebuild it; a deepcopy
    (the EMA target) builds its own over its own parameters."""
    import copy

    actor = random_actor(17, 6, 32, seed=3)
    actor.backend = "triton"
    builds = []
    check_params = kernels._check_params
    monkeypatch.setattr(kernels, "_check_params", lambda params: builds.append(len(params)) or check_params(params))
    z, r, t, obs, v = kernel_inputs(9, 17, 6)

    def agrees(module):
        with torch.no_grad():
            return relative_error(module.act(obs, z), kernels.act_reference(raw_tensors(module), obs, z)) <= REL_TOL

    opt = torch.optim.Adam(actor.parameters(), lr=0.1)
    for _ in range(3):
        with torch.no_grad():
            actor.act(obs, z)
        u, dudt = actor.velocity_and_dudt(z, r, t, obs, v)
        opt.zero_grad()
        (u - dudt).pow(2).mean().backward()
        opt.step()
        assert agrees(actor)  # the new values, read in place
    assert builds == [18]
    target = copy.deepcopy(actor)
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.5)
    assert agrees(target) and agrees(actor) and builds == [18, 18]
    assert kernels.actor_weights(actor) is not kernels.actor_weights(target)
    actor.double().float()  # the storage moves
    assert agrees(actor) and builds == [18] * 3
    actor.precision = "bf16"
    assert kernels.actor_weights(actor).precision == "bf16" and builds == [18] * 4


@needs_triton
@pytest.mark.parametrize("batch,obs_dim,act_dim,hidden", [(1, 59, 9, 256), (7, 17, 6, 256), (257, 29, 8, 48)])
def test_triton_folded_actor_matches_torch(batch, obs_dim, act_dim, hidden):
    actor = random_actor(obs_dim, act_dim, hidden, seed=batch + obs_dim)
    folded = ofql_eval.fold(actor)
    obs, noise = torch.randn(batch, obs_dim, device=KERNEL_DEVICE), 2 * torch.randn(batch, act_dim, device=KERNEL_DEVICE)
    out = kernels.folded_actor_triton(folded, obs, noise, out=nans(batch, act_dim), precision="ieee")
    with torch.no_grad():
        ref = folded(obs, noise)
    rel = relative_error(out, ref)
    print(f"folded actor {batch}x{obs_dim}->{act_dim} (hidden {hidden}): max relative error {rel:.2e}")
    assert not out.isnan().any() and rel <= REL_TOL
    assert out.abs().max() <= 1.0


@needs_triton
@pytest.mark.parametrize("batch", [1, 257])
def test_triton_time_embedding_matches_torch_in_value_and_gradient(batch):
    emb = random_actor(3, 2, 16, seed=batch).emb_t
    time = torch.rand(batch, device=KERNEL_DEVICE)
    out = kernels.time_embedding_triton(emb, time, out=nans(batch, 16), precision="ieee")
    rel = relative_error(out, emb(time).detach())
    print(f"time embedding batch {batch}: max relative error {rel:.2e}")
    assert not out.isnan().any() and rel <= REL_TOL
    weights = torch.randn(batch, 16, device=KERNEL_DEVICE)
    grads = {}
    for backend in ("triton", "torch"):
        time_ = time.clone().requires_grad_()
        loss = (kernels.time_embedding(emb, time_, backend=backend, precision="ieee") * weights).sum()
        grads[backend] = torch.autograd.grad(loss, [time_, *emb.parameters()])
    for g_triton, g_torch in zip(grads["triton"], grads["torch"]):
        assert relative_error(g_triton, g_torch) <= REL_TOL


@needs_triton
def test_triton_training_steps_match_torch_steps(monkeypatch):
    """OFQL updates with --kernels triton follow the torch ones. Per step: one `act` launch (TD target) and one
    u + du/dt launch (BC) whose u carries the gradients; the actor's torch network runs once (the Q-loss actions,
    which need their graph), never for u: u is computed once."""
    task = ofql.Task("kernels-test", obs_dim=17, act_dim=6, make_env=None, ref_min=0.0, ref_max=1.0, ref_source="none")
    batch_size = 33
    gen = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(batch_size, 17, generator=gen), "action": torch.rand(batch_size, 6, generator=gen) * 2 - 1,
             "reward": torch.randn(batch_size, generator=gen), "next_obs": torch.randn(batch_size, 17, generator=gen),
             "mask": torch.ones(batch_size)}
    batch = {k: v.to(KERNEL_DEVICE) for k, v in batch.items()}
    calls = []
    for name in ("act", "velocity_and_dudt", "velocity"):
        monkeypatch.setattr(kernels, name, lambda *a, _f=getattr(kernels, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    agents, metrics = {}, {}
    for backend in ("triton", "torch"):
        args = dataclasses.replace(small_args(hidden_dim=64, eta=0.1, grad_norm=5.0), kernels=backend,
                                   kernel_precision="ieee")
        torch.manual_seed(0)
        agents[backend] = ofql.OFQL(task, args, torch.device(KERNEL_DEVICE))
        assert agents[backend].actor.backend == backend
        net_calls = []
        agents[backend].actor.net.register_forward_hook(lambda *_: net_calls.append(1))
        agents[backend].actor.register_forward_hook(lambda *_: net_calls.append("forward"))
        for step in range(3):
            torch.manual_seed(step)
            metrics[backend] = agents[backend].update(batch, swap_heads=False)
        if backend == "triton":
            assert calls == ["act", "velocity_and_dudt"] * 3 and net_calls == [1] * 3
    assert calls == ["act", "velocity_and_dudt"] * 3  # none with --kernels torch
    for key in metrics["torch"]:
        assert abs(metrics["triton"][key] - metrics["torch"][key]) <= 1e-4 * (1 + abs(metrics["torch"][key])), key
    for p_triton, p_torch in zip(agents["triton"].actor.parameters(), agents["torch"].actor.parameters()):
        assert relative_error(p_triton, p_torch) <= 1e-4


def test_torch_backend_forced_through_a_short_training_run(tmp_path, monkeypatch):
    def no_kernels(*args, **kwargs):
        raise AssertionError("a Triton kernel ran with --kernels torch")

    for name in ("act", "velocity", "velocity_and_dudt", "fused_velocity"):
        monkeypatch.setattr(kernels, name, no_kernels)
    summary = ofql.train(ofql.Args(env="bandit-8modes", kernels="torch", out_dir=str(tmp_path), total_steps=20,
                                   eval_every=20, hidden_dim=32, log_every=10))
    assert summary["steps"] == 20 and np.isfinite(summary["final_score"])


def test_kernel_backend_and_precision_are_resolved_in_one_place(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    assert kernels.resolve_backend("auto") == "torch" and kernels.resolve_backend("torch") == "torch"
    with pytest.raises(ValueError, match="not usable here: Triton kernels need a CUDA GPU"):
        kernels.resolve_backend("triton")
    with pytest.raises(ValueError, match="not one of"):
        kernels.resolve_backend("cuda")
    assert kernels.resolve_precision("auto", "cpu") == "ieee" and kernels.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="not one of"):
        kernels.resolve_precision("fp16")
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # the interpreter is for tests: only on request
    assert kernels.resolve_backend("auto", "cpu") == "torch" and kernels.resolve_backend("triton", "cpu") == "triton"
    assert ofql.resolve_kernels("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # a usable GPU: the kernels still only on request (H200 run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.resolve_backend("auto", "cuda") == "torch" and kernels.resolve_backend("triton", "cuda") == "triton"
    monkeypatch.setattr(ofql, "kernels", None)  # ofql.py copied without kernels.py / triton
    monkeypatch.setattr(ofql, "KERNELS_IMPORT_ERROR", ImportError("No module named 'kernels'"))
    assert ofql.resolve_kernels("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs kernels.py next to ofql.py"):
        ofql.resolve_kernels("triton", torch.device("cpu"))


def test_kernel_launch_table_buckets():
    """Batch 1 to 15: one row per program (fp32 FMA, no 16-row tensor-core tile to pad, launched as ieee whatever the
    precision); from 16: 16-row tiles; from 2048 in tf32 / bf16: 64-row tiles (ieee's FFMA tiles stay at 16 rows).
    Tensor-core tiles are >= 16 in every dimension; every (row, precision) of the table is a build that is analysed."""
    batches = (1, 2, 15, 16, 256, 2047, 2048, 10 ** 6)
    assert [kernels.launch_config(b, "tf32").block_b for b in batches] == [1, 1, 1, 16, 16, 16, 64, 64]
    assert [kernels.launch_config(b, "bf16").block_b for b in batches] == [1, 1, 1, 16, 16, 16, 64, 64]
    assert [kernels.launch_config(b, "ieee").block_b for b in batches] == [1, 1, 1, 16, 16, 16, 16, 16]
    assert kernels.kernel_precision(kernels.launch_config(1, "bf16"), "bf16") == "ieee"
    for _, _, config in kernels.LAUNCH_TABLE:
        assert config.block_b < 16 or min(config.block_b, config.block_n, config.block_k) >= 16
    built = {(name, config, precision) for name, _, config, precision in kernels.shipped_builds()}
    for batch in batches:
        for precision in kernels.PRECISIONS:
            config = kernels.launch_config(batch, precision)
            for name in kernels.KERNEL_BUILDS:
                config_of = kernels.time_embedding_config(batch) if name.startswith("time embedding") else config
                assert (name, config_of, kernels.kernel_precision(config_of, precision)) in built


def test_ofql_copied_alone_runs_without_kernels(tmp_path):
    """ofql.py alone in an empty folder: no kernels.py (plain torch) and no data module, yet it trains on in-memory
    transitions and checkpoints; a task name says which file it needs. With ofql_data.py beside it, the CLI runs."""
    import shutil
    import subprocess

    shutil.copy(ofql.__file__, tmp_path / "ofql.py")
    code = ("import numpy as np, torch, ofql; print(ofql.kernels, ofql.resolve_kernels('auto', torch.device('cpu')))\n"
            "try: ofql.resolve_kernels('triton', torch.device('cpu'))\nexcept ValueError as e: print(e)\n"
            "rng = np.random.default_rng(0)\n"
            "obs, action = rng.normal(size=(300, 3)), rng.uniform(-1, 1, size=(300, 2))\n"
            "data = dict(obs=obs, action=action, reward=-np.abs(action).sum(1), next_obs=obs, mask=np.zeros(300))\n"
            "summary = ofql.train(ofql.Args(env='mine', total_steps=4, eval_every=2, batch_size=32, hidden_dim=16), data)\n"
            "print(summary['steps'], summary['final_score'], ofql.load_checkpoint(summary['checkpoint'])['agent']['step'])\n"
            "try: ofql.load_task('bandit-8modes')\nexcept ValueError as e: print(e)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch's default threads oversubscribe a busy machine
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "None torch", result.stderr
    assert "--kernels triton needs kernels.py next to ofql.py" in lines[1]
    assert lines[-2] == "4 None 4"  # trained, no evaluation (no make_env), checkpointed
    assert lines[-1].startswith("--env bandit-8modes loads through ofql_data.py, which is not next to ofql.py")
    shutil.copy(Path(ofql.__file__).with_name("ofql_data.py"), tmp_path / "ofql_data.py")
    result = subprocess.run([sys.executable, "ofql.py", "--env", "bandit-8modes", "--total-steps", "2", "--eval-every", "2",
                             "--hidden-dim", "16"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0 and "done: final normalized score" in result.stdout, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["ofql.py", "ofql_data.py"]


@needs_triton
def test_kernel_launchers_refuse_bad_inputs():
    folded = ofql_eval.fold(random_actor(11, 3, 32, seed=0))
    obs, noise = torch.randn(4, 11, device=KERNEL_DEVICE), torch.randn(4, 3, device=KERNEL_DEVICE)
    with pytest.raises(TypeError, match="float32"):
        kernels.folded_actor_triton(folded, obs.double(), noise)
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.folded_actor_triton(folded, torch.randn(11, 4, device=KERNEL_DEVICE).T, noise)
    with pytest.raises(ValueError, match=r"obs: expected shape \(4, 11\)"):
        kernels.folded_actor_triton(folded, obs[:, :10].contiguous(), noise)
    with pytest.raises(ValueError, match="4 Linear layers"):
        kernels.folded_actor_triton(ofql_eval.FoldedActor(ofql.mlp([14, 8, 3]), 3), obs, noise)
    weights = kernels.actor_weights(random_actor(11, 3, 32, seed=0))
    with pytest.raises(ValueError, match=r"r: expected shape \(4,\)"):
        kernels.velocity(weights, noise, obs[:, 0].contiguous()[:3], obs[:, 1].contiguous(), obs)


@needs_triton
def test_folded_policy_backends_agree():
    folded = ofql_eval.fold(random_actor(17, 6, 64, seed=5))
    obs, noise = torch.randn(7, 17, device=KERNEL_DEVICE), torch.randn(7, 6, device=KERNEL_DEVICE)
    torch_policy = kernels.folded_policy(folded, "torch")
    triton_policy = kernels.folded_policy(folded, "triton", precision="ieee")
    ref = torch_policy(obs, noise)
    assert not ref.requires_grad and relative_error(triton_policy(obs, noise), ref) <= REL_TOL


@pytest.fixture(scope="module")
def gpu_builds():
    """Every shipped kernel build (each LAUNCH_TABLE bucket x precision) compiled for sm_90 (H100) and sm_80 (A100)
    with Triton's bundled ptxas, analysed with its cuobjdump (kernels.build_analysis): one subprocess without the
    interpreter, once per test session (Triton caches the builds in ~/.triton: minutes the first time)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", "import json, kernels; print(json.dumps(kernels.build_analysis()))"],
                            capture_output=True, text=True, cwd=os.path.dirname(kernels.__file__), env=env, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernels.KERNEL_BUILDS for a in ("sm_90", "sm_80")}
    kernels.print_build_analysis(rows)
    return rows


def test_gpu_builds_have_no_register_spills_or_local_memory(gpu_builds):
    bad = [(r["kernel"], r["arch"], r["block_b"], r["precision"], r["spill_instructions"], r["stack_bytes"],
            r["local_bytes"]) for r in gpu_builds if r["spill_instructions"] or r["stack_bytes"] or r["local_bytes"]]
    assert not bad, f"spills / local memory (kernel, arch, rows, precision, LDL+STL, stack, local): {bad}"
    assert max(r["registers"] for r in gpu_builds) <= 255


def test_gpu_builds_fit_the_shared_memory_of_their_gpu(gpu_builds):
    for r in gpu_builds:
        assert r["shared_bytes"] <= kernels.SHARED_MEMORY_LIMIT[int(r["arch"][3:])], r


def test_gpu_builds_use_tensor_cores_in_tf32_and_bf16(gpu_builds):
    """Tiles of >= 16 rows in tf32 / bf16: tensor-core instructions (HMMA = mma.sync, HGMMA = sm_90 wgmma); the
    ieee builds have none (exact fp32 FFMA), nor have one-row blocks (fp32 FMA by design)."""
    for r in gpu_builds:
        uses_tensor_cores = r["precision"] != "ieee" and r["block_b"] >= 16
        assert (r["tensor_core_instructions"] > 0) == uses_tensor_cores, r


def test_gpu_du_dt_kernel_loads_each_weight_tile_once(gpu_builds):
    """The tangent reuses the primal's weight tiles: in every build, the compiled u + du/dt kernel issues as many
    weight-tile loads (tt.load from kernels._weight_tile, loops not unrolled) as the primal-only act kernel, one per
    tile of the network: both time embeddings 3 each, the first layer 4 column blocks per output chunk, the hidden
    and output layers 1 per (k, n) step."""
    for r in gpu_builds:
        if r["kernel"] in ("velocity + du/dt", "act"):
            assert r["weight_tile_loads"] == 13, r
    # in machine code: the one-row builds are not software-pipelined, so their static SASS loads at _weight_tile's
    # line are what a program issues; the u + du/dt kernel issues exactly the primal act kernel's
    unpipelined = {(r["kernel"], r["arch"]): r["weight_tile_sass_loads"] for r in gpu_builds if r["block_b"] == 1}
    for arch in ("sm_90", "sm_80"):
        assert unpipelined[("velocity + du/dt", arch)] == unpipelined[("act", arch)] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check; a GPU runs the real thing")
def test_gpu_benchmark_dry_run_exercises_every_step_and_skips_only_cuda_rows(tmp_path, monkeypatch):
    """benchmarks/gpu.py --dry-run on this CPU: kernel tests collected, one build analysed, decisions/s and
    training speed timed at toy size, the projection computed; only the CUDA-only rows are skipped, and one
    JSON + one markdown file are written. Without --dry-run and without CUDA it refuses plainly."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import gpu

    with pytest.raises(SystemExit, match="no CUDA device here.*--dry-run"):
        gpu.main(gpu.Config(out=str(tmp_path)))
    result = gpu.main(gpu.Config(dry_run=True, out=str(tmp_path)))
    steps = result["steps"]
    assert not [name for name, step in steps.items() if isinstance(step, dict) and "error" in step], steps
    assert re.search(r"\d+/\d+ tests collected", steps["kernel_tests"]["summary"])
    assert [(r["kernel"], r["arch"], r["spill_instructions"]) for r in steps["build_analysis"]][0] == ("act", "sm_90", 0)
    assert {r["batch"] for r in steps["decision_frequency"]["rows"]} == {1, 3}
    speed = steps["training_speed"]
    assert set(speed["steps_per_second"]) == {"eager", "compile"} and all(v > 0 for v in speed["steps_per_second"].values())
    assert set(speed["skipped"]) == set(gpu.train_speed.CUDA_VARIANTS)
    assert steps["projection"]["hours_per_1M_steps"]["eager"] == pytest.approx(1e6 / speed["steps_per_second"]["eager"] / 3600)
    [json_file] = tmp_path.glob("gpu-dry-run-*.json")
    assert json.loads(json_file.read_text())["dry_run"] is True
    assert "DRY RUN, not a measurement" in json_file.with_suffix(".md").read_text()


def test_cli_kernels_triton_without_a_gpu_is_one_clear_error():
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --kernels triton is usable")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "ofql.py", "--env", "bandit-8modes", "--kernels", "triton"], env=env,
                            capture_output=True, text=True, cwd=os.path.dirname(ofql.__file__), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --kernels triton is not usable here: Triton kernels need a CUDA GPU")


# ------------------------------------------------------------------------------------------------
# Baselines (baselines.py): flow matching (--policy flow), DQL's DDPM (--policy diffusion), DDIM, toy figure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, eval_steps", [("meanflow", None), ("flow", 1), ("diffusion", None), ("diffusion", 1)])
def test_each_policy_class_learns_checkpoints_and_acts_in_bounds(tmp_path, policy, eval_steps):
    """A few gradient steps of the full OFQL update with each --policy: the BC loss falls, the checkpoint
    rebuilds the same class through eval.py, and its evaluation sampler gives actions in [-1, 1]."""
    torch.manual_seed(0)
    args = baseline_args(policy=policy, eval_policy_steps=eval_steps, hidden_dim=64, total_steps=150, eval_every=150)
    task, data = ofql.load_task("bandit-8modes")
    buffer = ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0))
    agent = ofql.OFQL(task, args, torch.device("cpu"))
    bc = [agent.update(buffer.sample(256), swap_heads=i % 2 == 0)["losses/bc_loss"].item() for i in range(150)]
    print(f"{policy}: BC loss {np.mean(bc[:20]):.3f} -> {np.mean(bc[-20:]):.3f}")
    assert agent.step == 150 and np.mean(bc[-20:]) < 0.9 * np.mean(bc[:20])
    assert (agent.actor_target is not agent.actor) == (policy == "diffusion")  # DQL's EMA actor by default

    summary = ofql.train(dataclasses.replace(args, out_dir=str(tmp_path), total_steps=3, eval_every=3))
    assert summary["args"].get("policy") == (None if policy == "meanflow" else policy)  # OFQL's: ofql.py's args
    loaded, *_ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"))
    assert type(loaded.actor) is type(agent.actor) and type(loaded.args) is type(args)
    torch.manual_seed(1)
    two = dataclasses.replace(loaded.args, eval_select="softmax", eval_samples=2)
    actions = ofql.sample_actions(loaded, torch.zeros(500, 1), two)
    assert actions.shape == (500, 2) and torch.isfinite(actions).all() and actions.abs().max() <= 1.0
    if policy != "meanflow":  # eval.py --eval-policy-steps 1: the same model acts in one network call
        one_step, *_ = ofql_eval.load_agent(summary["checkpoint"], torch.device("cpu"), eval_policy_steps=1)
        calls = []
        one_step.actor.net.register_forward_hook(lambda *_: calls.append(1))
        ofql.sample_actions(one_step, torch.zeros(4, 1), dataclasses.replace(one_step.args, eval_select="one"))
        assert one_step.args.eval_policy_steps == 1 and len(calls) == 1


def test_baseline_bc_losses_vanish_at_the_exact_velocity_and_noise():
    """For data that is a single point a0, the exact flow velocity (z - a0) / t and the exact noise
    (x_k - sqrt(abar_k) a0) / sqrt(1 - abar_k) make both BC losses zero (up to rounding)."""
    a0, obs, args = torch.tensor([[0.4, -0.7]]), torch.zeros(128, 1), small_args()

    class ExactFlow(baselines.FlowActor):
        def forward(self, x, time, obs):
            return (x - a0) / time[:, None]

    class ExactNoise(baselines.DiffusionActor):
        def forward(self, x, time, obs):
            abar = self.alpha_bar[time.long()][:, None]
            return (x - abar.sqrt() * a0) / (1 - abar).sqrt()

    flow_loss = ExactFlow(1, 2, hidden=4).bc_loss(obs, a0.expand(128, 2), args).item()
    ddpm_loss = ExactNoise(1, 2, hidden=4).bc_loss(obs, a0.expand(128, 2), args).item()
    print(f"BC loss at the exact field: flow {flow_loss:.2e}, ddpm {ddpm_loss:.2e}")
    assert flow_loss < 1e-9 and ddpm_loss < 1e-9


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_flow_euler_sampler_integrates_a_known_velocity_exactly(steps):
    """Straight-line fields are integrated exactly by Euler: a constant field c maps e to e - c, and the
    single-point field (z - a0) / t lands on a0; the sampler queries t = 1, (K-1)/K, ..., 1/K."""
    c, a0, seen = torch.tensor([[0.3, -0.5]]), torch.tensor([[-0.2, 0.6]]), []

    class Field(baselines.FlowActor):
        field = None

        def forward(self, x, time, obs):
            seen.append(time[0].item())
            return self.field(x, time[:, None])

    actor, noise, obs = Field(1, 2, hidden=4, steps=steps), torch.linspace(-0.4, 0.4, 12).view(6, 2), torch.zeros(6, 1)
    actor.field = lambda x, t: c.expand_as(x)
    assert torch.allclose(actor.sampler(steps)(obs, noise), noise - c, atol=1e-6)
    assert seen == pytest.approx([k / steps for k in range(steps, 0, -1)])
    actor.field = lambda x, t: (x - a0) / t
    assert torch.allclose(actor.act(obs, noise), a0.expand(6, 2), atol=1e-5)


@pytest.mark.parametrize("steps", [5, 50])
def test_vp_schedule_and_ddpm_posterior_match_closed_forms(steps):
    """DQL's vp schedule ends at abar_K = exp(-(b_min + (b_max - b_min) / 2)) for any K, and the
    posterior q(x_{k-1} | x_k, x0) coefficients equal Gaussian conditioning of the forward chain."""
    actor = baselines.DiffusionActor(1, 2, hidden=4, steps=steps).double()
    alphas = baselines.vp_alphas(steps)
    abar = torch.cumprod(alphas, 0)
    assert abar[-1].item() == pytest.approx(math.exp(-(0.1 + 9.9 / 2)), rel=1e-12)
    assert torch.allclose(actor.alpha_bar.double(), abar, rtol=1e-6)
    k = torch.arange(1, steps)  # k = 0 has a point-mass posterior (x0 itself)
    precision = 1 / (1 - abar[k - 1]) + alphas[k] / (1 - alphas[k])
    assert torch.allclose(actor.posterior_x0[k].double(), abar[k - 1].sqrt() / (1 - abar[k - 1]) / precision, rtol=1e-5)
    assert torch.allclose(actor.posterior_xk[k].double(), alphas[k].sqrt() / (1 - alphas[k]) / precision, rtol=1e-5)
    assert torch.allclose(actor.posterior_std[k].double() ** 2, 1 / precision, rtol=1e-5)


def test_ddpm_forward_chain_matches_q_xk_given_x0():
    """Running the forward chain x_k = sqrt(alpha_k) x_{k-1} + sqrt(1 - alpha_k) e from x0 has the moments
    of the closed form q(x_k | x0) = N(sqrt(abar_k) x0, 1 - abar_k), which `q_sample` draws from."""
    torch.manual_seed(0)
    steps, n, x0 = 5, 200_000, torch.tensor([0.7, -0.3])
    actor = baselines.DiffusionActor(1, 2, hidden=4, steps=steps)
    alphas, x = baselines.vp_alphas(steps).float(), x0.expand(n, 2)
    for k in range(steps):
        x = alphas[k].sqrt() * x + (1 - alphas[k]).sqrt() * torch.randn(n, 2)
        closed = actor.q_sample(x0.expand(n, 2), torch.full((n,), k), torch.randn(n, 2))
        mean, std = actor.alpha_bar[k].sqrt() * x0, (1 - actor.alpha_bar[k]).sqrt()
        for sample in (x, closed):
            assert torch.allclose(sample.mean(0), mean, atol=5 * std / math.sqrt(n)), k
            assert torch.allclose(sample.std(0), std.expand(2), rtol=0.01), k


def test_ddpm_and_ddim_recover_x0_from_a_perfect_noise_predictor():
    """With the true noise of a single x0, DQL's ancestral DDPM and DDIM with 1, 2 or K steps all return x0
    (the paper's one-step DDIM is exact for a perfect predictor; its failure is the learned one's error)."""
    x0 = torch.tensor([[0.3, -0.9]])

    class PerfectNoise(baselines.DiffusionActor):
        def forward(self, x, time, obs):
            abar = self.alpha_bar[time.long()][:, None]
            return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    torch.manual_seed(0)
    actor, obs, noise = PerfectNoise(1, 2, hidden=4, steps=5), torch.zeros(4, 1), torch.randn(4, 2)
    for name, sampler in {"ddpm": actor.sampler(None), **{f"ddim-{k}": actor.sampler(k) for k in (1, 2, 5)}}.items():
        assert torch.allclose(sampler(obs, noise), x0.expand(4, 2), atol=1e-5), name


def test_policy_flags_are_checked_and_defaulted():
    assert baseline_args(policy="diffusion").policy_steps == 5 and baseline_args(policy="diffusion").ema_actor
    assert baseline_args(policy="flow").policy_steps == 5 and not baseline_args(policy="flow").ema_actor
    assert not small_args().ema_actor and not hasattr(small_args(), "policy_steps")
    assert baseline_args() == small_args() and type(baseline_args()) is ofql.Args  # meanflow: ofql.py's run
    assert baseline_args(ema_actor=True) == small_args(ema_actor=True)
    with pytest.raises(ValueError, match="--policy meanflow acts in one step"):
        baseline_args(policy_steps=5)
    with pytest.raises(ValueError, match="DDIM strides over the trained schedule"):
        baseline_args(policy="diffusion", policy_steps=5, eval_policy_steps=10)
    with pytest.raises(ValueError, match="must be >= 1"):
        baseline_args(policy="flow", policy_steps=0)


def test_comparison_rows_take_dqls_settings_as_the_paper_ran_them():
    """--policy diffusion/flow: DQL's eta for the task (1.0 on MuJoCo, on the same mean-reduced loss), gamma and tau,
    DQL's EMA actor for diffusion, DQL's inference (50 candidates, softmax); OFQL keeps its own measured values."""
    for policy in ("diffusion", "flow"):
        args = baselines.BaselineArgs(env="hopper-medium-expert-v2", policy=policy).resolved()
        assert args.eta == 1.0 and (args.eval_select, args.eval_samples) == ("softmax", 50)
    assert baselines.BaselineArgs(env="hopper-medium-expert-v2", policy="diffusion").resolved().ema_actor
    assert baselines.BaselineArgs(env="antmaze-large-play-v0", policy="diffusion").resolved().eta == 4.5
    assert baselines.BaselineArgs(env="pendulum-swingup", policy="flow").resolved().eta == 3.0
    assert baselines.BaselineArgs(env="ogbench/cube-single-play-singletask-v0", policy="flow").resolved().eta == 1.0
    assert ofql.Args(env="hopper-medium-expert-v2").resolved().eta == ofql.MUJOCO_ETA
    assert baselines.BaselineArgs(env="hopper-medium-expert-v2").resolved().eta == ofql.MUJOCO_ETA
    assert baselines.BaselineArgs(env="hopper-medium-expert-v2", policy="flow", eta=0.2).resolved().eta == 0.2
    # gamma and tau: OFQL's measured MuJoCo values (D4RL names and other Minari data), DQL's for the comparison rows
    # and for the tasks whose presets hold DQL's; a given flag wins everywhere
    # and the critic's LayerNorm, likewise
    discount = lambda args: (args.gamma, args.tau)  # noqa: E731
    for env in ("hopper-medium-expert-v2", "standin/hopper/medium-v0"):
        assert discount(ofql.Args(env=env).resolved()) == (ofql.MUJOCO["gamma"], ofql.MUJOCO["tau"]) == (0.995, 0.02)
        assert discount(baselines.BaselineArgs(env=env).resolved()) == (0.995, 0.02)
        assert discount(baselines.BaselineArgs(env=env, policy="diffusion").resolved()) == (0.99, 0.005)
        assert discount(baselines.BaselineArgs(env=env, policy="flow", gamma=0.9, tau=0.1).resolved()) == (0.9, 0.1)
        assert ofql.Args(env=env).resolved().critic_layer_norm and baselines.BaselineArgs(env=env).resolved().critic_layer_norm
        for policy in ("diffusion", "flow"):
            assert not baselines.BaselineArgs(env=env, policy=policy).resolved().critic_layer_norm
        assert baselines.BaselineArgs(env=env, policy="flow", critic_layer_norm=True).resolved().critic_layer_norm
    for env in ("antmaze-large-play-v0", "pendulum-swingup", "bandit-8modes"):
        assert discount(ofql.Args(env=env).resolved()) == (0.99, 0.005)
        assert not ofql.Args(env=env).resolved().critic_layer_norm
    assert discount(ofql.Args(env="standin/hopper/medium-v0", tau=0.005).resolved()) == (0.995, 0.005)
    og = "ogbench/humanoidmaze-medium-navigate-singletask-v0"  # FQL's discount, for OFQL and the rows alike
    assert discount(baselines.BaselineArgs(env=og, policy="flow").resolved()) == discount(ofql.Args(env=og).resolved()) \
        == (0.995, 0.005)
    assert ofql.Args(env=og).resolved().critic_layer_norm  # FQL's critic on OGBench


def test_ofql_py_knows_no_baseline_and_names_the_baselines_command(tmp_path, monkeypatch):
    """ofql.py trains OFQL only: its Args have no --policy (its --help names baselines.py), and resuming a baseline's
    checkpoint with it is one clear error naming baselines.py's command, raised before any data is read; with
    baselines.py's BaselineArgs the same OFQL builds the baseline's actor and resumes the run."""
    import subprocess

    assert not {"policy", "policy_steps", "eval_policy_steps"} & {f.name for f in dataclasses.fields(ofql.Args)}
    help_text = subprocess.run([sys.executable, "ofql.py", "--help"], capture_output=True, text=True,
                               cwd=os.path.dirname(ofql.__file__), timeout=120).stdout
    assert "python baselines.py train --help" in help_text and "--policy {" not in help_text
    task = ofql.Task("bandit", 1, 2, None, 0.0, 1.0, "")
    assert type(ofql.OFQL(task, baseline_args(policy="flow", hidden_dim=8), torch.device("cpu")).actor) \
        is baselines.FlowActor
    flow = baselines.BaselineArgs(env="bandit-8modes", policy="flow", total_steps=2, eval_every=2, hidden_dim=8,
                                  out_dir=str(tmp_path))
    ckpt = ofql.train(flow)["checkpoint"]
    with monkeypatch.context() as patch:
        patch.setattr(ofql, "load_task", lambda *_, **__: pytest.fail("data read before the args check"))
        with pytest.raises(ValueError, match=f"python baselines.py train --resume {ckpt}"):
            ofql.train(ofql.Args(resume=ckpt))
    assert ofql.train(baselines.BaselineArgs(resume=ckpt))["args"]["policy"] == "flow"


def test_toy_figure_writes_its_png_and_json_with_mode_coverage(tmp_path):
    """The Figure 3 script end to end on a tiny budget (its learning is tested above, on the fixture's models)."""
    result = baselines.toy_figure(baselines.ToyConfig(steps=2, hidden=8, samples=100, png=str(tmp_path / "toy.png"),
                                                      json=str(tmp_path / "toy.json")))
    assert (tmp_path / "toy.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "toy.json").read_text())["measures"]
    assert saved == result["measures"] and set(saved) == {"data", "FM-1", "FM-2", "FM-5", "FM-10", "OFQL-1", "uniform"}
    assert saved["data"]["near_mode"] > 0.75 and saved["uniform"]["near_mode"] < 0.15


def test_onestep_drift_integrates_the_flow_and_reads_a_checkpoint(tmp_path, monkeypatch):
    """benchmarks/onestep_drift.py: its Euler integration of u(z, t, t) from noise (t = 1) to t = 0 matches the closed
    form of a linear field (u = z - m: z(0) = m + (e - m)(1 - 1/n)^n, so a sign or direction slip fails), and it
    scores a real checkpoint (the step, finite gaps), refusing data of another observation size."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import onestep_drift

    m, noise = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.9, 0.1], [-0.4, 0.5]])
    field = lambda z, r, t, obs: z - m  # noqa: E731
    expected = (m + (noise - m) * (1 - 1 / 7) ** 7).clamp(-1, 1)
    torch.testing.assert_close(onestep_drift.euler_flow(field, noise, torch.zeros(2, 1), 7), expected)
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=3, eval_every=3, hidden_dim=32))
    rng = np.random.default_rng(0)
    row = onestep_drift.drift(summary["checkpoint"], rng.normal(size=(64, 1)), rng.uniform(-1, 1, (64, 2)), 5, 0)
    assert row["step"] == 3 and all(np.isfinite(v) for k, v in row.items() if k.startswith(("rms", "q_")))
    with pytest.raises(ValueError, match="expects 1-dim observations, the data has 3"):
        onestep_drift.drift(summary["checkpoint"], rng.normal(size=(8, 3)), rng.uniform(-1, 1, (8, 2)), 5, 0)


def test_bc_gradient_scale_matches_the_adaptive_weight_of_a_single_sample(tmp_path, monkeypatch):
    """benchmarks/bc_gradient_scale.py: on a batch of one, the BC gradient with adaptive weight p is the plain one times
    (e + 1e-3)^-p exactly (e: that sample's error, the plain loss), so a mis-plumbed power or draw fails; p = 0 gives 1.
    It reads a real checkpoint and a fresh actor of its task."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import bc_gradient_scale

    args = ofql.Args(env="bandit-8modes", hidden_dim=32).resolved()
    actor = ofql.OFQL(ofql.load_task("bandit-8modes")[0], args, torch.device("cpu")).actor
    obs, action = torch.zeros(1, 1), torch.tensor([[0.5, -0.3]])
    weighted, _ = bc_gradient_scale.gradient_norm(actor, obs, action, args, 0.5, 7)
    plain, error = bc_gradient_scale.gradient_norm(actor, obs, action, args, 0.0, 7)
    assert weighted / plain == pytest.approx((error + 1e-3) ** -0.5, rel=1e-5)
    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=3, eval_every=3, hidden_dim=32))
    row = bc_gradient_scale.scale(summary["checkpoint"], 0.5, batches=3, batch_size=1, seed=0)
    assert row["step"] == 3 and row["trained_with_power"] == 0.5
    assert all(np.isfinite(row[at]["gradient_ratio"]) for at in ("trained", "initialisation"))
    assert bc_gradient_scale.scale(summary["checkpoint"], 0.0, 2, 8, 0)["trained"]["gradient_ratio"] == pytest.approx(1.0)


def test_vs_fql_rescores_each_run_once_and_reports_the_scores_beside_their_settings(tmp_path, monkeypatch):
    """benchmarks/vs_fql.py rescore evaluates a finished run's checkpoint under each action selection once (a second
    call skips it), with the environment resets of eval.py's seed 0; report pairs each re-score with its own run's
    settings (not the dataset's), beside the training-time scores and FQL's, mean and population std over seeds."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    monkeypatch.setenv("OGBENCH_DATASET_DIR", str(tmp_path))  # rescore points it at each run's data folder
    import vs_fql
    assert all(ofql.DROPPED_OPTIONS[option][0] == kept for option, kept in vs_fql.DROPPED.items())  # the report's copy

    def run_vs_fql(*argv):
        monkeypatch.setattr(sys, "argv", ["vs_fql.py", "--out", str(tmp_path / "out"), *argv])
        vs_fql.main()

    summary = ofql.train(ofql.Args(env="bandit-8modes", out_dir=str(tmp_path), total_steps=3, eval_every=3, hidden_dim=32))
    run_dir = Path(summary["checkpoint"]).parent
    (tmp_path / "out/runs").mkdir(parents=True)
    (tmp_path / "out/runs/ofql__bandit.json").write_text(json.dumps({"run_dir": str(run_dir), "dataset_dir": "x"}))
    run_vs_fql("rescore", "--episodes", "3")
    direct = ofql_eval.main(ofql_eval.EvalArgs(checkpoint=summary["checkpoint"], eval_protocol="paper", episodes=3))
    written = {p: json.loads((tmp_path / f"out/rescored/{run_dir.name}__{p}.json").read_text()) for p in ("paper", "one")}
    assert written["paper"]["per_seed"] == direct["per_seed"] and written["one"]["eval_select"] == "one"
    assert written["paper"]["seeds"] == written["one"]["seeds"] == [0] and written["one"]["episodes_per_seed"] == 3
    (tmp_path / f"out/rescored/{run_dir.name}__paper.json").write_text('{"score_mean": -1}')
    run_vs_fql("rescore", "--episodes", "3")  # exists: skipped, not evaluated again
    assert json.loads((tmp_path / f"out/rescored/{run_dir.name}__paper.json").read_text()) == {"score_mean": -1}
    with pytest.raises(SystemExit, match="no finished OFQL run"):
        run_vs_fql("rescore", "--runs", "nothing*")

    for path in (tmp_path / "out").rglob("*.json"):
        path.unlink()
    cube = "cube-single-play-singletask-task2-v0"
    base = ofql.Args(env=f"ogbench/{cube}").resolved()

    def finished(method, seed, success, eta=None, episode_return=None, task=2, protocol="one", sha=None, **rescores):
        name = f"{method}__cube-single-play-v0__task{task}__seed{seed}__50000__eta{eta}"
        settings = {k: getattr(dataclasses.replace(base, eta=eta or base.eta, eval_protocol=protocol), k)
                    for k in vs_fql.OFQL_SETTINGS}
        run = {"method": method, "dataset": "cube-single-play-v0", "task": task, "env_name": cube, "steps": 50_000,
               "success": success, "run_dir": f"/elsewhere/{name}", "ofql_args": settings}
        run |= {"return": episode_return} if episode_return is not None else {}  # older runs have no return
        run |= {"data_sha256": sha} if sha else {}  # nor the hash of their training file
        (tmp_path / f"out/runs/{name}.json").write_text(json.dumps(run))
        for protocol, score in rescores.items():
            (tmp_path / f"out/rescored/{name}__{protocol}.json").write_text(json.dumps({"score_mean": score,
                                                                                        "return_mean": score - 200}))

    finished("ofql", 0, 40.0, eta=0.3, episode_return=-160.0, paper=80.0, one=44.0)
    finished("ofql", 1, 36.0, eta=0.3, episode_return=-170.0, paper=60.0)
    finished("ofql", 0, 6.0, eta=0.1, paper=30.0, argmax=2.0)
    finished("fql", 0, 90.0, episode_return=-100.0)
    run_vs_fql("report")
    rows = {row["ofql_settings"].split(",")[0]: row for row in
            json.loads((tmp_path / "out/vs_fql.json").read_text())["rows"]}
    assert rows["eta 0.3"]["ofql"] == [40.0, 36.0] and rows["eta 0.3"]["fql"] == [90.0]
    assert rows["eta 0.3"]["ofql_rescored"] == {"paper": [80.0, 60.0], "one": [44.0]}
    assert rows["eta 0.3"]["ofql_rescored_mean_std"]["paper"] == [70.0, 10.0]
    assert rows["eta 0.1"]["ofql_rescored"] == {"paper": [30.0], "one": []}
    assert "| 70.0 ± 10.0 (2) / 44.0 ± 0.0 (1) |" in (tmp_path / "out/vs_fql.md").read_text()
    assert rows["eta 0.3"]["ofql_return_mean_std"] == [-165.0, 5.0] and rows["eta 0.3"]["fql_return_mean_std"] == [-100, 0]
    assert rows["eta 0.1"]["ofql_return_mean_std"] is None
    assert rows["eta 0.3"]["ofql_rescored_return_mean_std"] == {"paper": [-130.0, 10.0], "one": [-156.0, 0.0]}
    assert "| -165.0 ± 5.0 (2) | -130.0 ± 10.0 (2) / -156.0 ± 0.0 (1) | -100.0 ± 0.0 (1) |" in \
        (tmp_path / "out/vs_fql.md").read_text()
    assert json.loads((tmp_path / "out/vs_fql.json").read_text())["per_task"] == []  # one task: no per-task table
    assert json.loads((tmp_path / "out/vs_fql.json").read_text())["files"] == [
        {"dataset": "cube-single-play-v0", "sha256_prefix": "unrecorded", "fql": 1, "ofql": 3}]

    # the other four tasks at eta 0.3, trained under another selection: pooled by their re-scores, task by task
    for task, paper, one in ((1, 90.0, 50.0), (3, 20.0, 10.0), (4, 0.0, 0.0), (5, 40.0, 30.0)):
        finished("ofql", 0, one, eta=0.3, task=task, protocol="paper", sha="0123456789abcdef", paper=paper, one=one)
    run_vs_fql("report")
    files = json.loads((tmp_path / "out/vs_fql.json").read_text())["files"]
    files = {f["sha256_prefix"]: (f["ofql"], f["fql"]) for f in files}
    assert files == {"unrecorded": (3, 1), "01234567": (4, 0)}  # each file's runs, by method
    (per_task,) = json.loads((tmp_path / "out/vs_fql.json").read_text())["per_task"]  # eta 0.1 has one task: none
    assert per_task["tasks"]["2"] == {"paper": 70.0, "one": 44.0} and per_task["seeds"] == {"1": 1, "2": 2, "3": 1,
                                                                                           "4": 1, "5": 1}
    assert per_task["five_task_mean"] == {"paper": 44.0, "one": 26.8}  # (90+70+20+0+40)/5, (50+44+10+0+30)/5
    assert per_task["stds"] == {"1": {}, "2": {"paper": 10.0}, "3": {}, "4": {}, "5": {}}  # task2's paper: 80, 60
    assert "| 90.0 / 50.0 (1) | 70.0 ± 10.0 / 44.0 (2) | 20.0 / 10.0 (1) | 0.0 / 0.0 (1) | 40.0 / 30.0 (1) | " \
        "44.0 / 26.8 | 96 ± 1 |" in (tmp_path / "out/vs_fql.md").read_text()


def test_vs_fql_train_lists_the_runs_to_do_and_needs_the_data_only_for_them(tmp_path, monkeypatch, capsys):
    """`train --to-do` prints the runs without a summary (the campaign makes data only for them); with every run
    finished, train skips them without the dataset; a run to do without it stops with the command that makes it."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    monkeypatch.delenv("OGBENCH_DATASET_DIR", raising=False)
    import vs_fql

    def train(*argv):
        monkeypatch.setattr(sys, "argv", ["vs_fql.py", "--out", str(tmp_path), "--work", str(tmp_path / "work"),
                                          "train", "--dataset", "puzzle-3x3-play-v0", "--steps", "100", *argv])
        vs_fql.main()
        return capsys.readouterr().out.split()

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/ofql__puzzle-3x3-play-v0__task4__seed1__100__eta0.1.json").write_text("{}")
    assert train("--seeds", "0", "1", "--tag", "eta0.1", "--to-do") == [
        "ofql__puzzle-3x3-play-v0__task4__seed0__100__eta0.1", "fql__puzzle-3x3-play-v0__task4__seed0__100__eta0.1",
        "fql__puzzle-3x3-play-v0__task4__seed1__100__eta0.1"]
    assert train("--seeds", "1", "--methods", "ofql", "--tag", "eta0.1", "--to-do") == []
    assert train("--seeds", "1", "--methods", "ofql", "--tag", "eta0.1")[0] == "skip"
    with pytest.raises(SystemExit, match="puzzle-3x3-play-v0.npz.*Fix: python ogbench_tasks.py generate puzzle-3x3-play-v0"):
        train("--seeds", "0", "1", "--methods", "ofql", "--tag", "eta0.1", "--dataset-dir", str(tmp_path))


def test_vs_fql_reads_fqls_evaluations_by_absolute_step_without_a_restarts_first_one(tmp_path, monkeypatch):
    """FQL's eval.csv counts steps from its own start: an attempt resumed at 15k logs 5k for step 20k, and evaluates
    once at its step 1 (the restored parameters, already counted); vs_fql reads success % and return per absolute step."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import vs_fql

    (tmp_path / "eval.csv").write_text("evaluation/episode.return,evaluation/success,step\n"
                                       "-300.5,0.25,1\n-120.0,0.75,5000\n")
    assert vs_fql.fql_evals(15_000, tmp_path) == {20_000: (75.0, -120.0)}
    assert vs_fql.fql_evals(0, tmp_path) == {1: (25.0, -300.5), 5_000: (75.0, -120.0)}
    assert vs_fql.fql_evals(0, tmp_path / "not-started") == {}


# ------------------------------------------------------------------------------------------------
# Architecture: imports run one way, kernels.py <- ofql.py <- ogbench_tasks.py <- baselines.py <- eval.py, sweep.py, benchmarks/
# ------------------------------------------------------------------------------------------------
# the leaves (rank 0) import no project file; the data modules are imported by ofql.py where it resolves a task name
IMPORT_RANKS = {"kernels": 0, "ofql_data": 0, "ogbench_tasks": 0, "ofql": 1, "baselines": 2, "eval": 3, "sweep": 3}
# benchmarks/*: 3, tests: 4


def import_violations(root: Path) -> list[str]:
    """Every import, at module level or inside a function, of a project module ranked above the importing
    file or by a leaf (rank 0), and every import cycle among the project files of `root` (its *.py and
    benchmarks/*.py)."""
    files = sorted(root.glob("*.py")) + sorted(root.glob("benchmarks/*.py"))
    rank = {f.stem: IMPORT_RANKS.get(f.stem, 3 if f.parent.name == "benchmarks" else 4) for f in files}
    graph, problems = {f.stem: set() for f in files}, []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in {n.split(".")[0] for n in names} & (rank.keys() - {file.stem}):
                graph[file.stem].add(name)
                if rank[name] > rank[file.stem]:
                    problems.append(f"{file.relative_to(root)}:{node.lineno} imports {name} (rank {rank[name]}), "
                                    f"above itself (rank {rank[file.stem]})")
                elif rank[file.stem] == 0:
                    problems.append(f"{file.relative_to(root)}:{node.lineno} imports {name}: a leaf imports no project "
                                    "file")

    def cycle(path: list[str]) -> list[str] | None:
        for name in sorted(graph[path[-1]]):
            if name == path[0]:
                return path + [name]
            if name not in path and (found := cycle(path + [name])):
                return found
        return None

    cycles = {}  # one entry per set of files: the cycle as first found
    for stem in graph:
        if found := cycle([stem]):
            cycles.setdefault(frozenset(found), found)
    return problems + [f"import cycle {' -> '.join(c)}" for c in cycles.values()]


def test_imports_run_one_way_with_no_cycle(tmp_path):
    """No project file imports one above it (not even lazily in a function), and no two import each other."""
    problems = import_violations(Path(__file__).parent)
    assert not problems, "\n".join(problems)
    # the check itself: a lazy upward import and a cycle between two callers are both named with their line
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "kernels.py").write_text("import os\n\n\ndef bench():\n    from eval import time_calls\n")
    (tmp_path / "eval.py").write_text("import sweep\n")
    (tmp_path / "sweep.py").write_text("import eval\n")
    (tmp_path / "ofql.py").write_text("try:\n    import kernels\nexcept ImportError:\n    kernels = None\n\n\n"
                                      "def load_task(name):\n    import ofql_data\n    import ogbench_tasks\n")
    (tmp_path / "ofql_data.py").write_text("import numpy\n")
    (tmp_path / "ogbench_tasks.py").write_text("import ofql_data\n\n\ndef main():\n    import ofql\n")
    assert sorted(import_violations(tmp_path)) == [
        "import cycle eval -> sweep -> eval", "import cycle ofql -> ogbench_tasks -> ofql",
        "kernels.py:5 imports eval (rank 3), above itself (rank 0)",
        "ogbench_tasks.py:1 imports ofql_data: a leaf imports no project file",
        "ogbench_tasks.py:5 imports ofql (rank 1), above itself (rank 0)"]


def test_twin_critic_heads_match_separate_mlps_with_and_without_layer_norm():
    """Each head of the batched critic is its own Linear -> Mish (-> LayerNorm with its own affine) MLP,
    checked in float64 against nn.Sequential built from that head's weights."""
    torch.manual_seed(0)
    obs, action = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    for layer_norm in (False, True):
        critic = ofql.TwinCritic(5, 3, 13, layer_norm=layer_norm).double()
        with torch.no_grad():  # distinct affine per head, so a shared LayerNorm would fail
            for p in critic.parameters():
                p.add_(0.3 * torch.randn_like(p))
        q = critic(obs, action)
        linears = [m for m in critic.net if isinstance(m, ofql.EnsembleLinear)]
        norms = [m for m in critic.net if isinstance(m, ofql.EnsembleLayerNorm)]
        assert len(norms) == (3 if layer_norm else 0)
        for head in range(2):
            x = torch.cat([obs, action], -1)
            for i, lin in enumerate(linears):
                x = x @ lin.weight[head] + lin.bias[head]
                if i < 3:
                    x = torch.nn.functional.mish(x)
                    if layer_norm:
                        x = torch.nn.functional.layer_norm(x, (13,), norms[i].weight[head, 0], norms[i].bias[head, 0])
            err = (q[head] - x.squeeze(-1)).abs().max().item()
            print(f"layer_norm={layer_norm} head {head}: max abs error {err:.2e}")
            assert err < 1e-12


def test_every_number_of_the_readme_results_table_comes_from_a_committed_json():
    """benchmarks/check_readme_numbers.py: each number of the README's results table is in a JSON under
    benchmarks/results/ of its row (CORL's in ../shared/datasets/README.md), or its cell says it has none."""
    if not (Path(__file__).parent.parent / "shared" / "datasets" / "README.md").exists():
        pytest.skip("CORL's numbers live in ../shared/datasets/README.md, absent here")
    import subprocess

    run = subprocess.run([sys.executable, "benchmarks/check_readme_numbers.py"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stdout[-3000:]
