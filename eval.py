"""Evaluate OFQL checkpoints, and benchmark how many decisions per second a policy makes.

    python eval.py --checkpoint runs/<run>/checkpoint.pt --episodes 50 --seeds 0 1 2 --json result.json
    python eval.py --benchmark --threads 1 --json bench.json --plot bench.png
    python eval.py --checkpoint runs/<run>/checkpoint.pt --export-onnx policy.onnx

Evaluation prints raw return and normalized score (x 100), mean +- std over all episodes and over the
per-seed means. The benchmark times, on the current device and with random weights of identical width
(or a checkpoint's), one decision of:
  - OFQL one step: eager (time embeddings computed per call), folded (r = 0, t = 1 in the first bias),
    torch.compile of the folded net (where it compiles), numba (CPU: normalisation folded too, one
    compiled call), onnxruntime running the exported ONNX file (CPU), Triton's fused kernel and a
    CUDA-graph replay (CUDA);
  - flow matching with K Euler steps (K network calls) and DDPM as in DQL with K steps (K network calls);
  - candidate selection, the paper's inference (DQL's `sample_action`): 50 one-step candidates and one critic
    call (2 calls), and DQL's own shape, 50 DDPM-5 candidates and one critic call (6 calls).
It reports the policy call alone and the full act step a robot pays (numpy observation in ->
normalisation -> policy -> numpy action out). Medians over repetitions after a warm-up.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from tqdm import tqdm

import baselines
import ofql


@dataclass
class EvalArgs:
    checkpoint: str | None = None
    """checkpoint written by ofql.py (evaluation; optional for --benchmark)"""
    episodes: int = 10
    """episodes per seed"""
    envs: int | None = None
    """environments open at once (replaces the checkpoint's --eval-envs; None: the checkpoint's, all by default)"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """evaluation seeds: env seeds and policy noise from SeedSequence([seed, 0]) (training's evaluations use step >= 1)"""
    eval_protocol: Literal["paper", "argmax", "one", "deterministic"] | None = None
    """action selection (see ofql.py --eval-protocol); given, it replaces the checkpoint's selection, samples and
    temperature (None: the checkpoint's)"""
    eval_select: Literal["one", "softmax", "argmax"] | None = None
    """replaces the checkpoint's --eval-select"""
    eval_samples: int | None = None
    """candidates per decision for softmax/argmax (replaces the checkpoint's)"""
    eval_temperature: float | None = None
    """softmax temperature (replaces the checkpoint's)"""
    eval_noise_scale: float | None = None
    """std of the policy's noise draws (replaces the checkpoint's --eval-noise-scale)"""
    eval_ema: bool | None = None
    """evaluate the checkpoint's EMA copy of the actor (True) or its live actor (False); None: the checkpoint's
    --eval-ema. True needs a run trained with --eval-ema or --ema-actor"""
    eval_policy_steps: int | None = None
    """network calls per action for a --policy flow/diffusion checkpoint: Euler steps, or DDIM steps
    (None: the checkpoint's --eval-policy-steps)"""
    json: str | None = None
    """write the result here"""
    video: str | None = None
    """folder for an animated GIF of the first episode of each seed (needs a working MuJoCo renderer)"""
    device: str = "cpu"
    """torch device"""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """actor kernels (replaces the checkpoint's --kernels, so a policy trained with Triton evaluates on a CPU):
    auto = Triton's fused kernels (kernels.py) where CUDA and Triton are usable, else torch"""
    threads: int = 1
    """torch CPU threads"""
    benchmark: bool = False
    """measure decisions per second instead of evaluating"""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    """benchmark batch sizes (observations per call)"""
    obs_dim: int = 11
    """benchmark observation size without a checkpoint (hopper)"""
    act_dim: int = 3
    """benchmark action size without a checkpoint (hopper)"""
    min_time: float = 0.2
    """seconds of calls per repetition"""
    repeats: int = 7
    """repetitions (the median is reported)"""
    compile: bool = True
    """include torch.compile of the folded policy"""
    plot: str | None = None
    """PNG of decisions/s against network calls per decision (the paper's Figure 4, right)"""
    export_onnx: str | None = None
    """with --checkpoint: write its one-step policy (observation normalisation included) to this ONNX file
    instead of evaluating (inputs obs [B, obs_dim] raw and noise [B, act_dim] ~ N(0, I); output action)"""


def load_agent(path: str, device: torch.device, kernels: str = "auto", eval_policy_steps: int | None = None,
               eval_ema: bool | None = None):
    """(agent, task, normalizer, args) from a checkpoint, with clear errors for anything that does not fit;
    `kernels`, `eval_policy_steps` and `eval_ema` (when given) replace the checkpoint's."""
    state = ofql.load_checkpoint(path)
    args = dataclasses.replace(baselines.BaselineArgs(**state["args"]), kernels=kernels)  # every kind of checkpoint
    if eval_policy_steps is not None:
        args = dataclasses.replace(args, eval_policy_steps=eval_policy_steps)
    if eval_ema is not None:
        if eval_ema and not (args.ema_actor or args.eval_ema):
            raise ValueError(f"{path} holds no EMA copy of the actor (trained without --eval-ema and --ema-actor); "
                             "evaluate its live actor (--eval-ema False) or retrain with --eval-ema True")
        args = dataclasses.replace(args, eval_ema=eval_ema)
    args = args.resolved()  # an OFQL checkpoint's: a plain ofql.Args
    task, _ = ofql.load_task(args.env, with_data=False)
    if state["obs_mean"].shape != (task.obs_dim,):
        raise ValueError(f"{path}: its observations have {state['obs_mean'].shape[0]} dims, task {args.env} has "
                         f"{task.obs_dim}")
    agent = ofql.OFQL(task, args, device)
    agent.load_state_dict(state["agent"])
    return agent, task, ofql.Normalizer(state["obs_mean"].numpy(), state["obs_std"].numpy()), args


def with_eval_selection(args: ofql.Args, cfg: EvalArgs) -> ofql.Args:
    """The checkpoint's args with the action selection asked for on eval.py's command line."""
    fields = ("eval_select", "eval_samples", "eval_temperature", "eval_noise_scale")
    given = {name: getattr(cfg, name) for name in fields if getattr(cfg, name) is not None}
    if cfg.eval_protocol is not None:  # a protocol replaces the whole selection, then explicit fields refine it
        return dataclasses.replace(args, eval_protocol=cfg.eval_protocol,
                                   **{name: None for name in fields} | given).resolved()
    if "eval_select" in given:  # a new selection takes its candidates and noise from the protocol unless given
        given = {"eval_samples": None, "eval_noise_scale": None} | given
    return dataclasses.replace(args, **given).resolved() if given else args


class RecordFrames(gym.Wrapper):
    """An env that appends its RGB frame to `frames` after every step (--video)."""

    def __init__(self, env: gym.Env, frames: list):
        super().__init__(env)
        self.frames = frames

    def step(self, action):
        result = self.env.step(action)
        self.frames.append(self.env.render())
        return result


def recording(task: ofql.Task, frames: list) -> ofql.Task:
    """The task whose first env made, ofql.evaluate's first episode, appends its RGB frames to `frames`."""
    envs_made = 0

    def make_env(**kwargs):
        nonlocal envs_made
        envs_made += 1
        if envs_made > 1:
            return task.make_env(**kwargs)
        return RecordFrames(task.make_env(render_mode="rgb_array", **kwargs), frames)

    return dataclasses.replace(task, make_env=make_env)


def write_gif(path: Path, frames: list[np.ndarray], fps: int):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def evaluate_checkpoint(cfg: EvalArgs) -> dict:
    agent, task, normalizer, args = load_agent(cfg.checkpoint, torch.device(cfg.device), cfg.kernels,
                                               cfg.eval_policy_steps, cfg.eval_ema)
    args = with_eval_selection(args, cfg)
    if cfg.envs is not None:
        args = dataclasses.replace(args, eval_envs=cfg.envs).resolved()
    per_seed = []
    for seed in tqdm(cfg.seeds, desc="seeds", unit="seed"):
        frames = [] if cfg.video and task.make_env is not None else None
        try:
            result = ofql.evaluate(agent, recording(task, frames) if frames is not None else task, normalizer, args,
                                   cfg.episodes, seed)
        except Exception as err:  # rendering needs an OpenGL context that headless machines may lack
            if frames is None:
                raise
            print(f"warning: rendering failed ({type(err).__name__}: {str(err)[:200]}); evaluating without video. "
                  "Headless MuJoCo renders with MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (apt install libosmesa6).")
            frames = None
            result = ofql.evaluate(agent, task, normalizer, args, cfg.episodes, seed)
        if frames:
            write_gif(Path(cfg.video) / f"seed{seed}.gif", frames[::2], fps=25)
        per_seed.append(result)
    scores = np.array([s for r in per_seed for s in r["scores"]])
    seed_means = np.array([r["score_mean"] for r in per_seed])
    summary = {
        "checkpoint": cfg.checkpoint, "env": args.env, "episodes_per_seed": cfg.episodes, "seeds": cfg.seeds,
        "eval_protocol": args.eval_protocol, "eval_select": args.eval_select, "eval_samples": args.eval_samples,
        "eval_temperature": args.eval_temperature, "eval_noise_scale": args.eval_noise_scale,
        "eval_ema": args.eval_ema, "eval_envs": args.eval_envs, "policy": getattr(args, "policy", "meanflow"),
        "eval_policy_steps": getattr(args, "eval_policy_steps", None),
        "score_mean": float(scores.mean()), "score_std_episodes": float(scores.std()),
        "score_std_seeds": float(seed_means.std()), "return_mean": float(np.mean([r["return_mean"] for r in per_seed])),
        "ref_source": task.ref_source, "per_seed": per_seed,
    }
    print(f"{args.env}: normalized score {summary['score_mean']:.1f} +- {summary['score_std_episodes']:.1f} "
          f"(episodes) +- {summary['score_std_seeds']:.1f} (seeds), return {summary['return_mean']:.1f}, "
          f"{len(scores)} episodes, refs: {task.ref_source}")
    return summary


# ------------------------------------------------------------------------------------------------
# The folded one-step policy: what every deployment path below runs
# ------------------------------------------------------------------------------------------------
class FoldedActor(torch.nn.Module):
    """One-step policy as a plain MLP over [e, s] (what a robot runs): a = clip(e - mlp([e, s]), -1, 1)."""

    def __init__(self, net: torch.nn.Sequential, act_dim: int):
        super().__init__()
        self.net, self.act_dim = net, act_dim
        self.linears = [layer for layer in net if isinstance(layer, torch.nn.Linear)]

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = torch.cat([noise, obs], -1)
        *hidden, last = self.linears  # called functionally: module calls cost ~13 us at batch 1
        for layer in hidden:
            x = ofql.mish(torch.nn.functional.linear(x, layer.weight, layer.bias))
        return (noise - torch.nn.functional.linear(x, last.weight, last.bias)).clamp(-1.0, 1.0)


@torch.no_grad()
def fold(actor: ofql.MeanFlowActor) -> FoldedActor:
    """actor.act as a FoldedActor: r = 0 and t = 1 folded into the first layer's bias."""
    first, emb = actor.net[0], actor.one_step_times(actor.net[0].weight.device)[0]
    w_noise, w_time, w_obs = first.weight.split([actor.act_dim, len(emb), first.in_features - actor.act_dim - len(emb)], 1)
    layers = copy.deepcopy(actor.net)
    layers[0] = torch.nn.Linear(first.in_features - len(emb), first.out_features).to(first.weight.device)
    layers[0].weight.copy_(torch.cat([w_noise, w_obs], 1))
    layers[0].bias.copy_(first.bias + w_time @ emb)
    return FoldedActor(layers, actor.act_dim)


# ------------------------------------------------------------------------------------------------
# Deployment path for a CPU control loop: the whole one-step policy as one compiled call (numba)
# ------------------------------------------------------------------------------------------------
_numba_forward = None


def numba_forward():
    """Compile (once per process, ~1 s) and return the numba kernel
    forward(obs, noise, weights, biases) -> clip(noise - mlp([noise, obs]), -1, 1) on float32 arrays
    (noise None: drawn from numba's generator, seeded by forward.seed(value))."""
    global _numba_forward
    if _numba_forward is None:
        import numba

        one, two, big = np.float32(1.0), np.float32(2.0), np.float32(20.0)

        @numba.njit(fastmath=True)
        def add_bias_mish_(h, bias):
            # mish(x) = x tanh(softplus(x)) = x n / (n + 2) with n = e^x (e^x + 2): one exp per unit;
            # x is capped at 20 inside the exp, where n / (n + 2) is already 1 in fp32
            for i in range(h.shape[0]):
                for j in range(h.shape[1]):
                    x = h[i, j] + bias[j]
                    e = np.exp(min(x, big))
                    n = e * (e + two)
                    h[i, j] = x * n / (n + two)

        @numba.njit
        def forward(obs, noise, weights, biases):
            if noise is None:  # numba's own generator: no Python call per decision
                noise = np.random.standard_normal((obs.shape[0], weights[-1].shape[1])).astype(np.float32)
            x = np.concatenate((noise, obs), axis=1)
            for i in range(len(weights) - 1):
                h = np.dot(x, weights[i])  # BLAS
                add_bias_mish_(h, biases[i])
                x = h
            return np.minimum(np.maximum(noise - (np.dot(x, weights[-1]) + biases[-1]), -one), one)

        @numba.njit
        def seed(value):
            np.random.seed(value)

        forward.seed = seed
        _numba_forward = forward
    return _numba_forward


class NumbaPolicy:
    """The one-step policy as a robot runs it: numpy observation in, numpy action out, one native call.
    Observation normalisation and the r = 0, t = 1 time embeddings are folded into the first layer, so
    a decision is 4 BLAS matrix products, 3 Mish loops and a clip, compiled by numba (fp32).

        policy = NumbaPolicy(fold(agent.actor), normalizer)
        action = policy(raw_obs)            # obs [obs_dim] or [batch, obs_dim]

    Fastest at small batches (the control-loop case); torch wins at large batches (its GEMMs)."""

    def __init__(self, folded: FoldedActor, normalizer: ofql.Normalizer, seed: int = 0):
        self.forward = numba_forward()
        weights = [layer.weight.detach().cpu().double().numpy().T for layer in folded.linears]
        biases = [layer.bias.detach().cpu().double().numpy() for layer in folded.linears]
        self.act_dim = folded.act_dim
        mean, std = normalizer.mean.astype(np.float64), normalizer.std.astype(np.float64)
        w_obs = weights[0][self.act_dim:]  # W (s - m) / sd = (W / sd) s - (W / sd) m
        biases[0] = biases[0] - (mean / std) @ w_obs
        weights[0] = np.concatenate([weights[0][:self.act_dim], w_obs / std[:, None]])
        self.weights = tuple(np.ascontiguousarray(w, np.float32) for w in weights)
        self.biases = tuple(np.ascontiguousarray(b, np.float32) for b in biases)
        self.obs_dim = len(mean)
        self.forward.seed(seed)  # numba's generator is one per process: the last policy built seeds it

    def __call__(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        single = obs.ndim == 1
        obs = obs.reshape(-1, self.obs_dim)
        if noise is not None:
            noise = np.asarray(noise, np.float32).reshape(len(obs), self.act_dim)
        action = self.forward(obs, noise, self.weights, self.biases)
        return action[0] if single else action


# ------------------------------------------------------------------------------------------------
# Deployment path without Python: the one-step policy as an ONNX file (onnxruntime, C++, C#, mobile)
# ------------------------------------------------------------------------------------------------
class ExportablePolicy(torch.nn.Module):
    """A FoldedActor on raw observations, written with ops that export to ONNX: (s - mean) / std, the MLP
    with F.mish (ONNX's Mish op; ofql.mish picks its kernel by tensor size, which export cannot trace
    for a dynamic batch) and the clip. Same function as folded(normalizer(obs), noise)."""

    def __init__(self, folded: FoldedActor, normalizer: ofql.Normalizer):
        super().__init__()
        self.linears = torch.nn.ModuleList(copy.deepcopy(folded.linears))  # a copy: export moves it to the CPU
        self.register_buffer("mean", torch.tensor(normalizer.mean))
        self.register_buffer("std", torch.tensor(normalizer.std))

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = torch.cat([noise, (obs - self.mean) / self.std], -1)
        *hidden, last = self.linears
        for layer in hidden:
            x = torch.nn.functional.mish(layer(x))
        return (noise - last(x)).clamp(-1.0, 1.0)


def export_onnx(folded: FoldedActor, normalizer: ofql.Normalizer, path: str | Path):
    """Write the policy to `path`: inputs `obs` [batch, obs_dim] and `noise` [batch, act_dim] (float32),
    output `action` [batch, act_dim] in [-1, 1]; the batch axis is dynamic. Needs onnx and onnxscript."""
    policy = ExportablePolicy(folded, normalizer).cpu().eval()
    obs_dim, act_dim = len(normalizer.mean), folded.act_dim
    batch = torch.export.Dim("batch")
    example = (torch.zeros(2, obs_dim), torch.zeros(2, act_dim))  # batch 2: torch.export specialises a batch of 1
    torch.onnx.export(policy, example, str(path), input_names=["obs", "noise"], output_names=["action"],
                      dynamic_shapes={"obs": {0: batch}, "noise": {0: batch}}, dynamo=True, verbose=False)


class OnnxPolicy:
    """An exported policy run by onnxruntime on the CPU: numpy raw observation in, numpy action out.

        policy = OnnxPolicy("policy.onnx")
        action = policy(raw_obs)            # obs [obs_dim] or [batch, obs_dim]"""

    def __init__(self, path: str | Path, threads: int = 1, seed: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.obs_dim, self.act_dim = (self.session.get_inputs()[i].shape[1] for i in (0, 1))
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        single = obs.ndim == 1
        obs = obs.reshape(-1, self.obs_dim)
        if noise is None:
            noise = self.rng.standard_normal((len(obs), self.act_dim), dtype=np.float32)
        action = self.session.run(None, {"obs": obs, "noise": np.asarray(noise, np.float32)})[0]
        return action[0] if single else action


def export_checkpoint(path: str, out: str) -> dict:
    """eval.py --checkpoint PATH --export-onnx OUT."""
    agent, task, normalizer, args = load_agent(path, torch.device("cpu"), "torch")
    if not isinstance(agent.actor, ofql.MeanFlowActor):
        raise ValueError(f"--export-onnx exports OFQL's one-step policy (--policy meanflow); {path} is --policy "
                         f"{args.policy}")
    export_onnx(fold(agent.actor), normalizer, out)
    print(f"wrote {out}: obs [batch, {task.obs_dim}] (raw observations) and noise [batch, {task.act_dim}] "
          f"(standard normal) -> action [batch, {task.act_dim}] in [-1, 1]")
    return {"checkpoint": path, "onnx": out, "obs_dim": task.obs_dim, "act_dim": task.act_dim}


# ------------------------------------------------------------------------------------------------
# Decision-frequency benchmark
# ------------------------------------------------------------------------------------------------
def time_calls(fn, min_time: float, repeats: int, device: torch.device) -> float:
    """Median seconds per call over `repeats` repetitions of at least `min_time` seconds, after warm-up.
    On CUDA a repetition is timed with CUDA events (launches are asynchronous)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time / 4:
        fn()
        count += 1
    sync()
    per_rep = max(1, int(count * 4))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(per_rep):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / per_rep)
        else:
            start = time.perf_counter()
            for _ in range(per_rep):
                fn()
            samples.append((time.perf_counter() - start) / per_rep)
    return statistics.median(samples)


def cuda_graph_policy(policy, batch: int, obs_dim: int, act_dim: int, device: torch.device):
    """`policy` captured once as a CUDA graph for this batch size: a decision is two input copies and one
    graph replay (no per-kernel launch cost). Returns policy(obs, noise) -> the graph's output tensor."""
    static_obs, static_noise = torch.zeros(batch, obs_dim, device=device), torch.zeros(batch, act_dim, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as the CUDA-graph docs require
        for _ in range(3):
            policy(static_obs, static_noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_action = policy(static_obs, static_noise)

    def replay(obs, noise):
        static_obs.copy_(obs)
        static_noise.copy_(noise)
        graph.replay()
        return static_action
    return replay


PAPER_CANDIDATES = ofql.EVAL_PROTOCOLS["paper"][1]


def candidate_policy(sampler, critic: torch.nn.Module, n: int):
    """policy(obs, noise) that draws `n` candidates per observation from `sampler` (its own noise; the given
    noise is unused) and picks one by softmax over the min of the two critics: ofql.sample_actions's path."""
    agent = SimpleNamespace(evaluation_act=sampler, critic_target=critic)
    args = ofql.Args(eval_select="softmax", eval_samples=n, eval_temperature=1.0, eval_noise_scale=1.0)
    return lambda obs, noise=None: ofql.sample_actions(agent, obs, args)


def benchmark(cfg: EvalArgs) -> dict:
    """Decisions per second of each policy at each batch size: the policy call alone and the full act step."""
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    if cfg.checkpoint:
        agent, task, normalizer, args = load_agent(cfg.checkpoint, device, cfg.kernels)
        if not isinstance(agent.actor, ofql.MeanFlowActor):
            raise ValueError(f"--benchmark --checkpoint takes an OFQL (--policy meanflow) checkpoint, this one is "
                             f"--policy {args.policy}; the baselines are timed with random weights of the same width")
        actor = agent.actor
    else:
        actor = ofql.MeanFlowActor(cfg.obs_dim, cfg.act_dim).to(device)
        normalizer = ofql.Normalizer(np.zeros(cfg.obs_dim), np.ones(cfg.obs_dim))
    actor.eval()
    folded = fold(actor)
    obs_dim, act_dim, hidden = folded.net[0].in_features - actor.act_dim, actor.act_dim, folded.net[0].out_features
    # name -> (network calls per decision, policy(obs, noise), whether it takes "torch" or "numpy" inputs)
    policies = {"ofql-1 eager": (1, actor.act, "torch"), "ofql-1 folded": (1, folded, "torch")}
    if cfg.compile:
        try:
            compiled = torch.compile(folded, dynamic=False)
            with torch.no_grad():
                compiled(torch.zeros(1, obs_dim, device=device), torch.zeros(1, act_dim, device=device))
            policies["ofql-1 folded+compile"] = (1, compiled, "torch")
        except Exception as err:  # no C++ compiler, unsupported platform...
            print(f"torch.compile unavailable here ({type(err).__name__}); skipped")
    if ofql.resolve_kernels(cfg.kernels, device) == "triton":
        policies["ofql-1 triton"] = (1, ofql.kernels.folded_policy(folded, "triton"), "torch")
    if device.type == "cpu":
        try:
            policies["ofql-1 numba"] = (1, NumbaPolicy(folded, normalizer), "numpy")
        except ImportError:
            print("numba is not installed; the numba row is skipped (pip install numba)")
        try:
            with tempfile.TemporaryDirectory() as folder:  # the session holds the model once it is built
                export_onnx(folded, normalizer, f"{folder}/policy.onnx")
                policies["ofql-1 onnxruntime"] = (1, OnnxPolicy(f"{folder}/policy.onnx", cfg.threads), "numpy")
        except ImportError as err:
            print(f"{err.name} is not installed; the onnxruntime row is skipped (pip install onnx onnxscript onnxruntime)")
    # the baselines' own samplers (baselines.py), random weights of the same width
    flow = baselines.FlowActor(obs_dim, act_dim, hidden).to(device).eval()
    for k in (1, 5, 10, 50):
        policies[f"flow-euler-{k}"] = (k, flow.sampler(k), "torch")
    for k in (5, 50):
        policies[f"ddpm-{k}"] = (k, baselines.DiffusionActor(obs_dim, act_dim, hidden, steps=k).to(device).eval().sampler(), "torch")
    policies["ddim-1"] = (1, baselines.DiffusionActor(obs_dim, act_dim, hidden, steps=5).to(device).eval().sampler(1), "torch")
    # candidate selection: N one-step (or DDPM-5) samples per observation, one critic call over all of them, softmax
    critic = agent.critic_target if cfg.checkpoint else ofql.TwinCritic(obs_dim, act_dim, hidden).to(device).eval()
    ddpm5 = baselines.DiffusionActor(obs_dim, act_dim, hidden, steps=5).to(device).eval().sampler()
    for name, calls, sampler in ((f"ofql-1 paper ({PAPER_CANDIDATES} cand. + critic)", 2, actor.act),
                                 (f"dql sample_action (ddpm-5 x {PAPER_CANDIDATES} + critic)", 6, ddpm5)):
        policies[name] = (calls, candidate_policy(sampler, critic, PAPER_CANDIDATES), "torch")

    rows = []
    with torch.no_grad():
        for batch in cfg.batch_sizes:
            per_batch = dict(policies)
            if device.type == "cuda":
                per_batch["ofql-1 folded+cuda-graph"] = (1, cuda_graph_policy(folded, batch, obs_dim, act_dim, device), "torch")
            obs_np = np.random.default_rng(0).normal(size=(batch, obs_dim)).astype(np.float32)
            noise_np = np.random.default_rng(1).normal(size=(batch, act_dim)).astype(np.float32)
            obs, noise = torch.as_tensor(obs_np, device=device), torch.as_tensor(noise_np, device=device)
            for name, (calls, policy, inputs) in tqdm(per_batch.items(), desc=f"batch {batch}", leave=False):
                if inputs == "numpy":  # normalisation is inside the policy: the act step is one call
                    def policy_call():
                        return policy(obs_np, noise_np)

                    def act_step():
                        return policy(obs_np)
                else:
                    def policy_call():
                        return policy(obs, noise)

                    def act_step():  # what a control loop pays: numpy in, numpy out
                        o = torch.from_numpy(normalizer(obs_np)).to(device)
                        return policy(o, torch.randn(len(o), act_dim, device=device)).cpu().numpy()

                call = time_calls(policy_call, cfg.min_time, cfg.repeats, device)
                step = time_calls(act_step, cfg.min_time, cfg.repeats, torch.device("cpu"))  # ends on the host
                rows.append({"policy": name, "network_calls": calls, "batch": batch,
                             "policy_call_us": call * 1e6, "act_step_us": step * 1e6,
                             "decisions_per_s": batch / call, "act_steps_decisions_per_s": batch / step})
    result = {"device": str(device), "threads": cfg.threads, "torch": torch.__version__,
              "obs_dim": obs_dim, "act_dim": act_dim, "rows": rows}
    for batch in cfg.batch_sizes:
        part = [r for r in rows if r["batch"] == batch]
        ref = {r["policy"]: r["decisions_per_s"] for r in part}
        best = max(v for k, v in ref.items() if k.startswith("ofql"))
        print(f"\nbatch {batch}, {cfg.threads} thread(s), {device}; ratio = best OFQL / this policy")
        print("| policy | calls | policy call (us) | decisions/s | act step (us) | act-step decisions/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in part:
            print(f"| {r['policy']} | {r['network_calls']} | {r['policy_call_us']:.1f} | {r['decisions_per_s']:,.0f} | "
                  f"{r['act_step_us']:.1f} | {r['act_steps_decisions_per_s']:,.0f} | {best / r['decisions_per_s']:.1f}x |")
    if cfg.plot:
        plot_frequency(rows, cfg.plot)
    return result


def plot_frequency(rows: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batch = min(r["batch"] for r in rows)
    part = [r for r in rows if r["batch"] == batch]
    for prefix, marker in (("ofql", "*"), ("ofql-1 paper", "X"), ("flow-euler", "o"), ("ddpm", "s"), ("ddim", "D"),
                           ("dql", "P")):
        sel = [r for r in part if r["policy"].startswith(prefix) and (prefix != "ofql" or r["network_calls"] == 1)]
        ax.plot([r["network_calls"] for r in sel], [r["decisions_per_s"] for r in sel], marker,
                ls="-" if len(sel) > 1 and prefix != "ofql" else "", label=prefix, ms=10 if prefix == "ofql" else 6)
    for r in part:  # name each one-step variant
        if r["policy"].startswith("ofql"):
            ax.annotate(r["policy"].removeprefix("ofql-1 "), (r["network_calls"], r["decisions_per_s"]), xytext=(8, -3),
                        textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls per decision")
    ax.set_ylabel(f"decisions / s (batch {batch})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(cfg: EvalArgs) -> dict:
    if cfg.benchmark:
        result = benchmark(cfg)
    elif cfg.checkpoint and cfg.export_onnx:
        result = export_checkpoint(cfg.checkpoint, cfg.export_onnx)
    elif cfg.checkpoint:
        torch.set_num_threads(cfg.threads)
        result = evaluate_checkpoint(cfg)
    else:
        raise ValueError("pass --checkpoint PATH to evaluate (with --export-onnx FILE: to export its policy), "
                         "or --benchmark")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(EvalArgs))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
