"""Training speed of one OFQL gradient step (critic + actor + critic target), variants side by side.

    python benchmarks/train_speed.py --threads 1 --batch-size 256 --json out.json

Variants, all the same networks and losses (hopper shapes: obs 11, action 3, hidden 256):
  eager                ofql.py as shipped: dual-number JVP (tangent without autograd graph), one-sigmoid Mish
  func.jvp             the target from `torch.func.jvp` (primal with graph taken from the JVP call)
  func.jvp+aten        as func.jvp, with aten's `mish` (the plain eager prototype)
  compile              `torch.compile` of the gradient step, no CUDA graphs (ofql.py --compile on a CPU)
  compile+cudagraphs   ofql.py --compile on CUDA (mode reduce-overhead)                      [CUDA only]
  triton               ofql.py --kernels triton: u + du/dt and the TD target's actions fused  [CUDA only]
  triton+compile+cudagraphs   both                                                           [CUDA only]
Rounds interleave the variants so machine noise hits all of them alike; the table shows medians and the
hours 1M steps would take at that speed (the paper's length).
"""
from __future__ import annotations

import contextlib
import dataclasses
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

CPU_VARIANTS = ("eager", "func.jvp", "func.jvp+aten", "compile")
CUDA_VARIANTS = ("compile+cudagraphs", "triton", "triton+compile+cudagraphs")


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
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu` or `cuda`; the CUDA-only variants run on CUDA only"""
    variants: tuple[str, ...] = CPU_VARIANTS + CUDA_VARIANTS
    """variants to time (those that cannot run on the device are listed as skipped)"""
    json: str | None = None
    """write the results to this JSON file"""


HOPPER_SHAPES = ofql.Task("bench", 11, 3, None, 0.0, 1.0, "")  # obs 11, action 3


def random_hopper_buffer(device: torch.device, n: int = 100_000) -> ofql.ReplayBuffer:
    """Random transitions of hopper's shapes: timing needs the shapes, not the data."""
    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(size=(n, 11)), "action": rng.uniform(-1, 1, (n, 3)), "reward": rng.normal(size=n),
            "next_obs": rng.normal(size=(n, 11)), "mask": np.ones(n)}
    return ofql.ReplayBuffer(data, device, torch.Generator(device).manual_seed(0))


def func_jvp_velocity_and_dudt(actor):
    def velocity_and_dudt(z, r, t, obs, v):
        return torch.func.jvp(lambda z_, r_, t_: actor(z_, r_, t_, obs), (z, r, t),
                              (v, torch.zeros_like(r), torch.ones_like(t)))
    return velocity_and_dudt


def make_agent(name: str, args: ofql.Args, device: torch.device) -> ofql.OFQL:
    """An agent that runs `name`; the func.jvp variants patch theirs while timed (see patched)."""
    triton, cudagraphs = name.startswith("triton"), name.endswith("cudagraphs")
    args = dataclasses.replace(args, kernels="triton" if triton else "torch", compile=cudagraphs)
    torch.manual_seed(0)
    agent = ofql.OFQL(HOPPER_SHAPES, args, device)
    if name == "compile":  # torch.compile without CUDA graphs, whatever the device
        agent.gradient_step = torch.compile(agent.eager_gradient_step, dynamic=False)
    return agent


@contextlib.contextmanager
def patched(agent: ofql.OFQL, name: str):
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


def skip_reason(name: str, device: torch.device) -> str | None:
    if name not in CPU_VARIANTS + CUDA_VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(CPU_VARIANTS + CUDA_VARIANTS)}")
    if name in CUDA_VARIANTS and device.type != "cuda":
        return "CUDA only"
    if name.startswith("triton") and ofql.resolve_kernels("auto", device) != "triton":
        return "Triton unusable here"
    return None


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    args = ofql.Args(env="hopper-medium-v2", batch_size=cfg.batch_size, device=device.type).resolved()
    buffer = random_hopper_buffer(device)
    skipped = {name: reason for name in cfg.variants if (reason := skip_reason(name, device))}
    agents = {name: make_agent(name, args, device) for name in cfg.variants if name not in skipped}
    times = {name: [] for name in agents}
    for round_ in range(cfg.rounds + 1):  # round 0 warms up (and compiles)
        for name, agent in list(agents.items()):
            try:
                with patched(agent, name):
                    start = time.perf_counter()
                    for i in range(cfg.steps):
                        agent.update(buffer.sample(cfg.batch_size), swap_heads=i % 2 == 0)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
            except Exception as err:  # one broken variant must not cost the others' rows
                skipped[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                del agents[name], times[name]
                continue
            if round_ > 0:
                times[name].append(cfg.steps / (time.perf_counter() - start))
    speeds = {name: statistics.median(v) for name, v in times.items()}
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": cfg.threads,
              "batch_size": cfg.batch_size, "torch": torch.__version__, "steps_per_second": speeds,
              "hours_per_1M_steps": {name: 1e6 / value / 3600 for name, value in speeds.items()}, "skipped": skipped}
    base = speeds.get("eager")
    print(f"\nOFQL gradient step on {result['device']}, batch {cfg.batch_size}, {cfg.threads} thread(s), "
          f"median of {cfg.rounds} rounds")
    print("| variant | steps/s | ms/step | hours per 1M steps | vs eager |\n|---|---|---|---|---|")
    for name, value in speeds.items():
        ratio = f"{value / base:.2f}x" if base else "-"
        print(f"| {name} | {value:.1f} | {1000 / value:.2f} | {1e6 / value / 3600:.1f} | {ratio} |")
    for name, reason in skipped.items():
        print(f"| {name} | skipped: {reason} | | | |")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
