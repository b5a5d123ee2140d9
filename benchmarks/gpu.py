"""Everything to measure the day a GPU is lent, in one command: one JSON and one markdown table.

    bash benchmarks/gpu.sh                      # = python benchmarks/gpu.py; on a CUDA machine
    python benchmarks/gpu.py --dry-run          # on a CPU: every step at toy size, the CUDA-only rows skipped

Steps, in order (a failing step is recorded and the next one still runs):
  1. kernel tests    test_ofql.py's Triton tests on the GPU, without the interpreter (dry run: collected only)
  2. build analysis  `python kernels.py`: registers, spills, shared memory, tensor-core instructions per build
  3. decisions/s     eval.py's benchmark at batch 1, 256, 4096: eager, folded, torch.compile, CUDA graph, Triton,
                     the paper's protocol (50 candidates + critic) and the baselines' samplers
  4. training speed  benchmarks/train_speed.py: eager, compile, compile + CUDA graphs, Triton (+ compile + graphs)
  5. projection      hours for the paper's 1M training steps at each training speed, against the goals
Goals (issue 13, for the table, not tests): 1M steps on one H100 in <= 30 minutes; batch-1 one-step decisions
>= 20,000/s with CUDA graphs or Triton. The paper: 6.3 h on an A100, 496-846 decisions/s.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import eval as ofql_eval  # noqa: E402
import train_speed  # noqa: E402  (this folder is on sys.path)

KERNEL_TESTS = "kernel or triton or gpu_builds"  # pytest -k: every test of kernels.py and its GPU builds
GOAL_HOURS_PER_1M = 0.5  # 1M steps in <= 30 minutes on one H100
GOAL_BATCH1_DECISIONS = 20_000  # one-step decisions per second at batch 1, CUDA graphs or Triton
PAPER = "6.3 h per 1M steps (A100), 496-846 decisions/s"


@dataclass
class Config:
    dry_run: bool = False
    """every step at toy size on whatever device there is (CPU here): checks the pipeline, measures nothing"""
    out: str = "benchmarks/results"
    """folder for gpu-<device>-<date>.json and .md"""
    batch_sizes: tuple[int, ...] = (1, 256, 4096)
    """decision-frequency batch sizes"""
    train_rounds: int = 5
    """timed rounds per training variant (train_speed.py --rounds)"""
    train_steps: int = 200
    """gradient steps per round (train_speed.py --steps)"""
    threads: int = 1
    """torch CPU threads"""


def kernel_tests(cfg: Config) -> dict:
    """pytest over the kernel tests in a subprocess without TRITON_INTERPRET (conftest.py sets it only when CUDA
    is absent); a dry run only collects them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "pytest", "-q", "test_ofql.py", "-k", KERNEL_TESTS, "-p", "no:cacheprovider"]
    command += ["--collect-only"] if cfg.dry_run else []
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log = Path(cfg.out) / "kernel_tests.log"  # every failure's traceback, beside the JSON
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        raise RuntimeError(f"pytest exited {done.returncode}: {summary} (tracebacks: {log})\n" + "\n".join(failed))
    return {"command": " ".join(command[1:]), "summary": summary, "collected_only": cfg.dry_run, "log": str(log)}


def build_analysis(cfg: Config) -> list[dict]:
    """kernels.build_analysis in a subprocess (it needs TRITON_INTERPRET unset before kernels is imported); a dry
    run analyses one kernel, one precision, for sm_90 only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    call = ("kernels.build_analysis(capabilities=(90,), precisions=('ieee',), names=('act',))" if cfg.dry_run
            else "kernels.build_analysis()")
    done = subprocess.run([sys.executable, "-c", f"import json, kernels; print(json.dumps({call}))"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build analysis failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def decision_frequency(cfg: Config, device: torch.device) -> dict:
    small = dict(batch_sizes=[1, 3], min_time=0.002, repeats=1, compile=False) if cfg.dry_run else \
        dict(batch_sizes=list(cfg.batch_sizes))
    return ofql_eval.benchmark(ofql_eval.EvalArgs(benchmark=True, device=device.type, threads=cfg.threads, **small))


def training_speed(cfg: Config, device: torch.device) -> dict:
    variants = ("eager", "compile") + train_speed.CUDA_VARIANTS  # the CUDA-only ones are skipped on a CPU
    rounds, steps = (1, 2) if cfg.dry_run else (cfg.train_rounds, cfg.train_steps)
    return train_speed.main(train_speed.Config(threads=cfg.threads, rounds=rounds, steps=steps, device=device.type,
                                               variants=variants))


def projection(speed: dict, frequency: dict) -> dict:
    """Hours per 1M training steps per variant, and the best batch-1 decisions/s, against the goals."""
    hours = speed["hours_per_1M_steps"]
    batch1 = {r["policy"]: r["decisions_per_s"] for r in frequency["rows"] if r["batch"] == 1}
    fastest_train = min(hours, key=hours.get)
    one_step = {k: v for k, v in batch1.items() if k.startswith("ofql-1") and "cand." not in k}
    fastest_policy = max(one_step, key=one_step.get)
    return {"hours_per_1M_steps": hours, "fastest_training": fastest_train,
            "fastest_training_hours": hours[fastest_train], "training_goal_met": hours[fastest_train] <= GOAL_HOURS_PER_1M,
            "fastest_one_step_policy": fastest_policy, "batch1_decisions_per_s": one_step[fastest_policy],
            "decision_goal_met": one_step[fastest_policy] >= GOAL_BATCH1_DECISIONS}


def markdown(result: dict) -> str:
    lines = [f"# GPU benchmark: {result['device']} ({result['date']}){' - DRY RUN, not a measurement' if result['dry_run'] else ''}",
             "", f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, {result['wall_s']:.0f} s", ""]
    for name, step in result["steps"].items():
        if "error" in step:
            lines.append(f"- **{name}: failed**: {step['error'].splitlines()[0]}")
    if "kernel_tests" in result["steps"] and "error" not in result["steps"]["kernel_tests"]:
        lines += [f"- kernel tests: {result['steps']['kernel_tests']['summary']}"]
    if "projection" in result["steps"] and "error" not in result["steps"]["projection"]:
        p = result["steps"]["projection"]
        lines += ["", "| goal | measured | met |", "|---|---|---|",
                  f"| 1M training steps <= {GOAL_HOURS_PER_1M * 60:.0f} min | {p['fastest_training_hours'] * 60:.1f} min "
                  f"({p['fastest_training']}) | {'yes' if p['training_goal_met'] else 'no'} |",
                  f"| batch-1 decisions/s >= {GOAL_BATCH1_DECISIONS:,} | {p['batch1_decisions_per_s']:,.0f} "
                  f"({p['fastest_one_step_policy']}) | {'yes' if p['decision_goal_met'] else 'no'} |",
                  f"| the paper | {PAPER} | |"]
    if "training_speed" in result["steps"] and "error" not in result["steps"]["training_speed"]:
        speed = result["steps"]["training_speed"]
        lines += ["", "| training variant | steps/s | hours per 1M steps |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {speed['hours_per_1M_steps'][k]:.2f} |" for k, v in speed["steps_per_second"].items()]
        lines += [f"| {k} | skipped: {v} | |" for k, v in speed["skipped"].items()]
    if "decision_frequency" in result["steps"] and "error" not in result["steps"]["decision_frequency"]:
        lines += ["", "| policy | batch | network calls | decisions/s | act-step decisions/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['batch']} | {r['network_calls']} | {r['decisions_per_s']:,.0f} | "
                  f"{r['act_steps_decisions_per_s']:,.0f} |" for r in result["steps"]["decision_frequency"]["rows"]]
    if "build_analysis" in result["steps"] and "error" not in result["steps"]["build_analysis"]:
        keys = ["kernel", "arch", "batch_from", "precision", "registers", "spill_instructions", "shared_bytes", "hmma",
                "hgmma"]
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in result["steps"]["build_analysis"]]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    if not cfg.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run on a GPU machine, or pass --dry-run to check the pipeline")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import triton
    result = {"device": name, "dry_run": cfg.dry_run, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "commit": commit or "unknown", "steps": {}}
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{'dry-run' if cfg.dry_run else name.replace(' ', '_')}-{result['date']}"

    def write() -> None:  # after every step: a run stopped at a time limit keeps the steps it finished
        result["wall_s"] = time.time() - start
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(markdown(result))

    steps = [("kernel_tests", lambda: kernel_tests(cfg)), ("build_analysis", lambda: build_analysis(cfg)),
             ("decision_frequency", lambda: decision_frequency(cfg, device)),
             ("training_speed", lambda: training_speed(cfg, device)),
             ("projection", lambda: projection(result["steps"]["training_speed"], result["steps"]["decision_frequency"]))]
    for step, run in steps:
        print(f"== {step}", flush=True)
        try:
            result["steps"][step] = run()
        except Exception as err:  # record it and go on: one broken step must not cost the others' numbers
            traceback.print_exc()
            result["steps"][step] = {"error": f"{type(err).__name__}: {err}"}
        write()
    print(markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
