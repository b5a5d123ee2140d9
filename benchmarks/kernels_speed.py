"""Speed of each fused Triton op of kernels.py against its torch reference in ofql.py.

    python benchmarks/kernels_speed.py [--batches 1 256] [--json out.json]

Microseconds per call (median, CUDA events on a GPU) of torch eager, torch.compile of the same reference,
and the Triton launcher, for: the folded one-step actor (inference), u and du/dt (the MeanFlow target's
JVP) and the time embedding. Random weights of the given width. Triton is skipped where it cannot run
(no CUDA; its CPU interpreter is not timed).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
import ofql  # noqa: E402  (the torch references)
from eval import fold, time_calls  # noqa: E402


@dataclass
class Config:
    batches: tuple[int, ...] = (1, 256)
    """batch sizes to time"""
    obs_dim: int = 17
    act_dim: int = 6
    hidden: int = 256
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu` or `cuda`"""
    threads: int = 1
    """torch CPU threads"""
    compile: bool = True
    """include the torch.compile column"""
    precision: str = "auto"
    """Triton kernels' input precision: auto (tf32 on sm_80+), ieee, tf32, bf16"""
    min_time: float = 0.2
    """seconds per timed run"""
    json: str | None = None
    """also write the results to this file"""


@torch.no_grad()  # all three ops are inference or stop-gradient computations
def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.manual_seed(0)
    actor = ofql.MeanFlowActor(cfg.obs_dim, cfg.act_dim, cfg.hidden).to(device).requires_grad_(False)
    folded = fold(actor)
    skip = kernels.triton_unusable_reason(device) if not kernels.INTERPRETED else "the CPU interpreter is not timed"
    if not skip:
        weights = kernels.ActorWeights(actor, cfg.precision)
        policy = kernels.folded_policy(folded, "triton", cfg.precision)
    rows = []
    for batch in cfg.batches:
        obs, noise = torch.randn(batch, cfg.obs_dim, device=device), torch.randn(batch, cfg.act_dim, device=device)
        t = torch.rand(batch, device=device)
        r = t * torch.rand(batch, device=device)
        ops = {  # name: (torch reference, Triton launcher: weight sets built once, as in training and deployment)
            "folded actor (inference)": (lambda: folded(obs, noise), lambda: policy(obs, noise)),
            "act (TD target, r = 0 and t = 1 folded in-kernel)": (lambda: actor.act(obs, noise),
                                                                 lambda: kernels.act(weights, obs, noise)),
            "u and du/dt (JVP target)": (lambda: actor.velocity_and_dudt(noise, r, t, obs, noise),
                                         lambda: kernels.velocity(weights, noise, r, t, obs, noise)),
            "time embedding": (lambda: actor.emb_t(t), lambda: kernels.time_embedding_triton(actor.emb_t, t)),
        }
        for name, (reference, fused) in ops.items():
            row = {"op": name, "batch": batch, "device": str(device),
                   "eager_us": time_calls(reference, cfg.min_time, 5, device) * 1e6, "compile_us": None}
            if cfg.compile:
                try:
                    compiled = torch.compile(reference, dynamic=False)
                    row["compile_us"] = time_calls(compiled, cfg.min_time, 5, device) * 1e6
                except Exception as err:  # no C++ compiler, unsupported platform...
                    row["compile_skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            row["triton_us"] = None if skip else time_calls(fused, cfg.min_time, 5, device) * 1e6
            rows.append(row)
            print(f"{name}, batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                         if k.endswith("_us") and v is not None), flush=True)
    print(f"\n{device}, {cfg.threads} thread(s), torch {torch.__version__}, triton {triton.__version__}; "
          f"obs {cfg.obs_dim}, act {cfg.act_dim}, hidden {cfg.hidden}; microseconds per call (median)")
    print("| op | batch | torch eager | torch.compile | Triton |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k]:.1f}" if row[k] is not None else "—" for k in ("eager_us", "compile_us", "triton_us")]
        print(f"| {row['op']} | {row['batch']} | " + " | ".join(cells) + " |")
    if skip:
        print(f"Triton skipped: {skip}")
    result = {"device": str(device), "threads": cfg.threads, "torch": torch.__version__, "triton": triton.__version__,
              "obs_dim": cfg.obs_dim, "act_dim": cfg.act_dim, "hidden": cfg.hidden, "triton_skipped": skip, "rows": rows}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
