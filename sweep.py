"""Sweeps of `ofql.train` on Ray: tasks x seeds x hyperparameter grids, resumable, with a report.

    python sweep.py --env hopper-medium-v2 walker2d-medium-v2 --seeds 0 1 2 --grid eta=0.01,0.1 [ofql.py flags]
    python sweep.py --report sweeps/<name>

Every (task, seed, grid point) is one Ray task that runs `ofql.train` in its own folder
`<sweep>/<task>__<key>=<value>...__seed<seed>/`, named from those three only, so that a restart with the
same arguments finds it. A run is *finished* when its folder holds a readable summary.json (ofql.py
writes it once, after the last step and checkpoint); a run with only a checkpoint.pt is resumed from it
(`ofql.train` with `--resume`, exact: every RNG state is in the checkpoint); a folder with neither starts
from scratch. A worker that dies (killed, out of memory, node lost) or raises an unexpected exception is
retried by Ray (`--max-retries`) and so resumes from its last checkpoint; bad input (unknown task, missing
dataset, invalid flag values) and divergence fail at once, since a retry would fail the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import tyro

import ofql
import ofql_data
from baselines import BaselineArgs

# The OFQL paper's normalized scores (x 100; DESIGN.md section 5): per task where published, and the
# domain averages (MuJoCo over its 9 tasks, AntMaze over 6, Kitchen over 3).
PAPER_SCORES = {
    "halfcheetah-medium-v2": 63.8, "halfcheetah-medium-replay-v2": 51.2, "halfcheetah-medium-expert-v2": 95.2,
    "hopper-medium-v2": 103.6, "hopper-medium-replay-v2": 101.9, "hopper-medium-expert-v2": 110.2,
    "walker2d-medium-v2": 87.4, "walker2d-medium-replay-v2": 106.2, "walker2d-medium-expert-v2": 113.0,
}
PAPER_DOMAIN_AVERAGES = {"MuJoCo": 92.5, "AntMaze": 84.6, "Kitchen": 67.0}
SWEEP_OWNED_FLAGS = {"env": "--env TASK [TASK ...]", "seed": "--seeds N [N ...]", "out_dir": "--out",
                     "run_dir": "--out", "exp_name": "--out", "resume": "a restart of the same sweep command"}
KILL_HOOK_ENV = "OFQL_SWEEP_TEST_KILL_AFTER_CHECKPOINT"  # tests: path of a marker; the first run to checkpoint dies once


def domain_of(task: str) -> str | None:
    """The paper's domain of a task name (the key of PAPER_DOMAIN_AVERAGES), None for other tasks."""
    if task in ofql_data.D4RL_MUJOCO:
        return "MuJoCo"
    family = task.split("-")[0]
    return {"antmaze": "AntMaze", "kitchen": "Kitchen"}.get(family) if task in ofql_data.DQL_SETTINGS else None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """sweep.py's own flags, and the rest (ofql.py flags, validated later by tyro against BaselineArgs)."""
    parser = argparse.ArgumentParser(
        description="Run ofql.train over tasks x seeds x grid points as Ray tasks; any other flag goes to every "
                    "run (see `python ofql.py --help`).", allow_abbrev=False)
    parser.add_argument("--env", nargs="+", metavar="TASK", help="tasks (ofql.py --env names)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="N", help="seeds (default: 0)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a BaselineArgs field (ofql.py's flags, baselines.py's --policy...) and its values; repeat "
                             "for a cartesian product")
    parser.add_argument("--out", help="sweep folder (default: sweeps/sweep-<hash of the arguments>)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. `auto`, host:6379); default: start Ray here")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all of this machine)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs reserved per run (default 1)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs (or a fraction) per run (default 0)")
    parser.add_argument("--max-retries", type=int, default=3, help="retries of a run whose worker dies or raises unexpectedly (default 3)")
    parser.add_argument("--last-k", type=int, default=5, help="report the mean of the last K evaluations too")
    parser.add_argument("--report", metavar="SWEEP_DIR", help="only aggregate an existing sweep folder")
    return parser.parse_known_args(argv)


def ofql_args_from(flags: list[str]) -> BaselineArgs:
    """BaselineArgs (ofql.py's flags, --policy...) from pass-through flags; tyro reports a typo or a bad value (and
    exits) before anything starts."""
    owned = [f for f in flags if f.startswith("--") and f[2:].split("=")[0].replace("-", "_") in SWEEP_OWNED_FLAGS]
    if owned:
        name = owned[0][2:].split("=")[0].replace("-", "_")
        raise ValueError(f"{owned[0]} is set by sweep.py; use {SWEEP_OWNED_FLAGS[name]} instead")
    return tyro.cli(BaselineArgs, args=flags, prog="sweep.py [ofql.py flags]")


def parse_grid(specs: list[str], base_flags: list[str]) -> list[dict[str, object]]:
    """`--grid key=v1,v2` options -> the cartesian product of {field: value}, values typed by BaselineArgs."""
    fields = {f.name: f for f in dataclasses.fields(BaselineArgs)}
    given = {f[2:].split("=")[0].replace("-", "_") for f in base_flags if f.startswith("--")}
    axes: list[list[dict[str, object]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip(","):
            raise ValueError(f"--grid {spec!r}: write KEY=V1,V2 (e.g. --grid eta=0.01,0.1)")
        if key not in fields:
            close = ", ".join(difflib.get_close_matches(key, fields, n=3)) or "see python ofql.py --help"
            raise ValueError(f"--grid {spec!r}: BaselineArgs has no field '{key}' (did you mean: {close})")
        if key in SWEEP_OWNED_FLAGS:
            raise ValueError(f"--grid {spec!r}: '{key}' is set by sweep.py; use {SWEEP_OWNED_FLAGS[key]}")
        if key in given:
            raise ValueError(f"--grid {spec!r}: --{key.replace('_', '-')} is also passed to every run; keep one")
        axes.append([{key: typed_value(key, raw.strip(), fields[key].type)} for raw in values.split(",") if raw.strip()])
    return [dict(kv for point in combo for kv in point.items()) for combo in itertools.product(*axes)]


def typed_value(key: str, raw: str, annotation) -> object:
    """One grid value parsed by tyro as ofql.py's command line would parse it."""
    flag = "--" + key.replace("_", "-")
    if "bool" in str(annotation) and raw.lower() in ("true", "false"):
        raw = raw.capitalize()  # tyro's spelling
    if annotation in (bool, "bool"):  # tyro's bool flags are --key / --no-key
        if raw not in ("True", "False"):
            raise ValueError(f"--grid {key}: {raw!r} is not true or false")
        argv = [flag if raw == "True" else "--no-" + key.replace("_", "-")]
    else:
        argv = [flag, raw]
    return getattr(tyro.cli(BaselineArgs, args=argv, prog=f"sweep.py --grid {key}=..."), key)


# ---------------------------------------------------------------------------------------------
# Runs and their folders
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    task: str
    seed: int
    point: dict[str, object]  # grid point {field: value}
    args: BaselineArgs

    @property
    def name(self) -> str:
        """Deterministic folder name: the same (task, seed, grid point) finds the same folder after a restart."""
        point = "__".join(f"{k}={v}" for k, v in self.point.items())
        return "__".join(filter(None, (self.task.strip("/").replace("/", "_"), point, f"seed{self.seed}")))


def plan_runs(tasks: list[str], seeds: list[int], points: list[dict], base: BaselineArgs, threads: int) -> list[Run]:
    """One Run per (task, grid point, seed); repeated ones (`--seeds 0 0`, `eta=0.1,0.10`) once."""
    runs = {}
    for task, point, seed in itertools.product(tasks, points, seeds):
        args = dataclasses.replace(base, env=task, seed=seed, **point)
        if args.threads is None:
            args = dataclasses.replace(args, threads=threads)
        args.resolved()  # invalid values (a negative eta in the grid...) fail before anything starts
        run = Run(task, seed, point, args)
        runs.setdefault(run.name, run)
    return list(runs.values())


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json if it is there and readable (= the run finished), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "history" in summary else None


def run_one(run_dir: str, args: BaselineArgs, session: str = "", kill_marker: str | None = None) -> dict:
    """Body of one Ray task: finish the run in `run_dir` (skip, resume or start) and return its status.

    Deterministic failures (bad input, divergence) are returned as status "failed"; anything else is
    raised, so that Ray retries the task, which then resumes from the last checkpoint."""
    run_dir = Path(run_dir)
    if read_summary(run_dir) is not None:
        return {"status": "done", "run_dir": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    try:
        start_step = ofql.load_checkpoint(ckpt)["agent"]["step"] if ckpt.exists() else 0
        with open(run_dir / "attempts.jsonl", "a") as log:  # one line per attempt: the evidence of resumes
            log.write(json.dumps({"session": session, "time": time.time(), "host": socket.gethostname(),
                                  "pid": os.getpid(), "start_step": start_step}) + "\n")
        if kill_marker and not Path(kill_marker).exists():
            arm_kill_after_checkpoint(kill_marker)
        run_args = BaselineArgs(resume=str(ckpt)) if ckpt.exists() else dataclasses.replace(args, run_dir=str(run_dir))
        with open(run_dir / "train.log", "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            ofql.train(run_args)  # BaselineArgs: --policy flow|diffusion sweep too
    except (ValueError, FileNotFoundError, ofql.DivergenceError) as err:
        message = f"{type(err).__name__}: {err}"
        (run_dir / "error.txt").write_text(message + "\n")
        return {"status": "failed", "run_dir": str(run_dir), "error": message}
    (run_dir / "error.txt").unlink(missing_ok=True)
    return {"status": "done", "run_dir": str(run_dir)}


def arm_kill_after_checkpoint(marker: str):
    """Test hook: this worker process dies (as if killed) right after its first checkpoint is written."""
    save = ofql.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if Path(path).name == "checkpoint.pt":
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # atomic: one worker in the sweep dies
            except FileExistsError:
                return
            os._exit(1)

    ofql.save_checkpoint = save_then_die


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def planned_before(sweep_dir: Path, base: BaselineArgs) -> list[str]:
    """The runs an earlier start of this sweep planned (from <sweep>/sweep.json); a restart must pass the
    same ofql.py flags (it may add tasks, seeds or grid points)."""
    record = sweep_dir / "sweep.json"
    if not record.exists():
        return []
    before, now = json.loads(record.read_text()), json.loads(json.dumps(dataclasses.asdict(base)))
    changed = sorted(k for k in set(before["ofql_args"]) | set(now) if before["ofql_args"].get(k) != now.get(k))
    if changed:
        raise ValueError(f"{sweep_dir} was started with other ofql.py flags ({', '.join(changed)}: "
                         f"{[before['ofql_args'].get(k) for k in changed]} then, {[now.get(k) for k in changed]} now); "
                         "restart it with the same flags or pass another --out")
    return before["runs"]


def start_ray(opts: argparse.Namespace):
    """Ray embedded on this machine, or joined to the cluster at --address; returns the ray module."""
    try:
        import ray
    except ImportError as err:
        raise ValueError("sweep.py needs Ray: pip install ray") from err
    if opts.address:
        try:
            ray.init(address=opts.address, log_to_driver=False)
        except ConnectionError as err:
            raise ValueError(f"cannot join the Ray cluster at {opts.address}: {err}. Is `ray start --head` running "
                             "there? Ray's token authentication also needs RAY_AUTH_MODE=token and the head's "
                             "~/.ray/auth_token (or RAY_AUTH_TOKEN) here") from err
    else:
        # "local": always a new embedded instance, never a cluster that happens to run here
        ray.init(address="local", num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    if opts.gpus_per_run > 0 and not ray.cluster_resources().get("GPU"):
        ray.shutdown()
        raise ValueError(f"--gpus-per-run {opts.gpus_per_run}, but the Ray cluster has no GPU")
    return ray


def run_sweep(runs: list[Run], base: BaselineArgs, sweep_dir: Path, opts: argparse.Namespace) -> dict[str, dict]:
    """Run every unfinished run as a Ray task; returns {run name: status}. Nothing is written before the
    flags, the tasks, their datasets and Ray have been checked."""
    planned = planned_before(sweep_dir, base)
    statuses = {run.name: {"status": "done", "run_dir": str(sweep_dir / run.name), "skipped": True}
                for run in runs if read_summary(sweep_dir / run.name) is not None}
    todo = [run for run in runs if run.name not in statuses]
    for task in sorted({run.task for run in todo}):  # fetch/convert each dataset once, before runs race for it
        ofql.load_task(task, d4rl_mirror=todo[0].args.d4rl_mirror)
    ray = start_ray(opts) if todo else None
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.json").write_text(json.dumps(
            {"ofql_args": dataclasses.asdict(base), "runs": sorted(set(planned) | {r.name for r in runs})}, indent=2))
        for run in runs:
            (sweep_dir / run.name).mkdir(exist_ok=True)
            (sweep_dir / run.name / "run.json").write_text(json.dumps({"task": run.task, "seed": run.seed,
                                                                       "grid": run.point}))
        print(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(todo)} already finished")
        if todo:
            statuses |= run_on_ray(ray, todo, sweep_dir, opts)
    finally:
        if ray is not None:
            ray.shutdown()
    return statuses


def run_on_ray(ray, todo: list[Run], sweep_dir: Path, opts: argparse.Namespace) -> dict[str, dict]:
    """Submit every run, then collect them as they finish, with a progress line; {run name: status}.
    A pending run counts as running once its attempt of this session is in its attempts.jsonl."""
    task = ray.remote(run_one).options(num_cpus=opts.cpus_per_run, num_gpus=opts.gpus_per_run,
                                       max_retries=opts.max_retries, retry_exceptions=True)
    session = uuid.uuid4().hex
    kill_marker = os.environ.get(KILL_HOOK_ENV)
    pending = {task.remote(str(sweep_dir / run.name), run.args, session, kill_marker): run for run in todo}

    def started(run: Run) -> bool:
        try:
            return f'"session": "{session}"' in (sweep_dir / run.name / "attempts.jsonl").read_text()
        except OSError:
            return False

    statuses, done, failed, shown = {}, 0, 0, ""
    while pending:
        running = sum(started(run) for run in pending.values())
        line = (f"runs: {done} done, {running} running, {len(pending) - running} queued, {failed} failed "
                f"(of {len(todo)})")
        if line != shown:
            print(line, flush=True)
            shown = line
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for ref in ready:
            run = pending.pop(ref)
            try:
                status = ray.get(ref)
            except Exception as err:  # retries exhausted: the worker kept dying or raising
                message = f"{type(err).__name__} after {opts.max_retries} retries: {(str(err).splitlines() or [''])[0]}"
                (sweep_dir / run.name / "error.txt").write_text(message + "\n")
                status = {"status": "failed", "run_dir": str(sweep_dir / run.name), "error": message}
            statuses[run.name] = status
            done += status["status"] == "done"
            failed += status["status"] == "failed"
            if status["status"] == "failed":
                print(f"failed: {run.name}: {status['error']}", flush=True)
    print(f"runs: {done} done, 0 running, 0 queued, {failed} failed (of {len(todo)})", flush=True)
    return statuses


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def fmt(values: list[float]) -> str:
    """mean +- population std over seeds, or a dash."""
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "—"


def collect(sweep_dir: Path, last_k: int) -> tuple[list[dict], list[str]]:
    """One record per run (finished or not) and the problems found: runs planned in sweep.json whose
    folder is gone, folders without run.json, unfinished, failed and corrupt runs."""
    records, problems = [], []
    try:
        planned = set(json.loads((sweep_dir / "sweep.json").read_text())["runs"])
    except (OSError, ValueError, KeyError):
        planned = set()
        problems.append("no readable sweep.json: only the run folders present are reported")
    folders = {p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "curves"}
    problems += [f"{name}: missing (planned, no run folder)" for name in sorted(planned - folders)]
    for run_dir in sorted(sweep_dir / name for name in folders):
        try:
            spec = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            problems.append(f"{run_dir.name}: no readable run.json (not a run folder of sweep.py), skipped")
            continue
        record = {"run": run_dir.name, "task": spec["task"], "seed": spec["seed"],
                  "grid": ", ".join(f"{k}={v}" for k, v in spec["grid"].items()) or "preset"}
        summary = read_summary(run_dir)
        history = [h["score_mean"] for h in summary["history"]] if summary else []
        if summary and history:
            record |= {"status": "done", "final_score": history[-1], "last_k_score": float(np.mean(history[-last_k:])),
                       "steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
                       "mujoco_data": summary["args"].get("mujoco_data", "d4rl"),  # older versions' option
                       "curve": [(h["step"], h["score_mean"]) for h in summary["history"]]}
        else:
            error = run_dir / "error.txt"
            if error.exists():
                why = "failed: " + error.read_text().strip()
            elif (run_dir / "summary.json").exists():
                why = "corrupt summary.json: restart the sweep to rewrite it from the last checkpoint"
            elif (run_dir / "checkpoint.pt").exists():
                why = "unfinished (checkpoint.pt, no summary.json): restart the sweep to resume it"
            else:
                why = "missing (never started or no checkpoint yet)"
            record["status"] = why
            problems.append(f"{run_dir.name}: {why}")
        records.append(record)
    return records, problems


def report(sweep_dir: str | Path, last_k: int = 5) -> dict:
    """Aggregate a sweep folder: report.md (printed), report.json, report.csv and curves/<task>.png."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir} is not a folder; pass the sweep folder that sweep.py printed")
    records, problems = collect(sweep_dir, last_k)
    finished = [r for r in records if r["status"] == "done"]
    tasks: dict[str, dict[str, dict]] = {}
    for r in finished:
        cell = tasks.setdefault(r["task"], {}).setdefault(r["grid"], {"seeds": [], "final": [], "last_k": []})
        cell["seeds"].append(r["seed"])
        cell["final"].append(r["final_score"])
        cell["last_k"].append(r["last_k_score"])
    # Minari's regeneration of the MuJoCo tasks (--mujoco-data minari) is not the paper's data
    comparable = {r["task"] for r in finished if not (r["task"] in ofql_data.D4RL_MUJOCO and r["mujoco_data"] == "minari")}

    def paper(task: str) -> float | None:
        return PAPER_SCORES.get(task) if task in comparable else None

    lines = [f"# Sweep {sweep_dir}", "", f"Normalized score x 100, mean ± std over seeds: the last evaluation of each "
             f"run, and the mean of its last {last_k} evaluations. Paper: OFQL (Nguyen & Yoo), D4RL data.", ""]
    for task, cells in sorted(tasks.items()):
        lines += [f"## {task}", "", f"| grid point | seeds | last eval | mean of last {last_k} | paper |",
                  "|---|---|---|---|---|"]
        for grid, cell in sorted(cells.items()):
            score = paper(task)
            lines.append(f"| {grid} | {len(cell['seeds'])} | {fmt(cell['final'])} | {fmt(cell['last_k'])} | "
                         f"{'—' if score is None else score} |")
        lines.append("")
    # domain -> grid point -> task -> task mean of the last evaluation; "best per task" picks each task's
    # grid point on those same scores (as the paper picked eta per task: optimistic, and marked so)
    domains: dict[str, dict[str, dict]] = {}
    for task, cells in tasks.items():
        if task in comparable and domain_of(task):
            per_grid = domains.setdefault(domain_of(task), {})
            for grid, cell in cells.items():
                per_grid.setdefault(grid, {})[task] = float(np.mean(cell["final"]))
            per_grid.setdefault("best per task *", {})[task] = max(float(np.mean(c["final"])) for c in cells.values())
    for per_grid in domains.values():
        if len(per_grid) == 2:  # a single grid point: nothing to select
            del per_grid["best per task *"]
    if domains:
        lines += ["## Domain averages", "", "Mean over the tasks present of each task's mean last evaluation. "
                  "\\* each task's best grid point, selected on the scores it reports (optimistic).", "",
                  "| domain | grid point | tasks | average | paper (all tasks) |", "|---|---|---|---|---|"]
        for domain, grids in sorted(domains.items()):
            total = {"MuJoCo": 9, "AntMaze": 6, "Kitchen": 3}[domain]
            for grid, per_task in sorted(grids.items()):
                lines.append(f"| {domain} | {grid} | {len(per_task)}/{total} | {np.mean(list(per_task.values())):.1f} | "
                             f"{PAPER_DOMAIN_AVERAGES[domain]} |")
        lines.append("")
    if problems:
        lines += ["## Runs not in the tables", ""] + [f"- {p}" for p in problems] + [""]
    text = "\n".join(lines)

    (sweep_dir / "report.md").write_text(text)
    result = {"sweep": str(sweep_dir), "last_k": last_k, "problems": problems,
              "tasks": {t: {g: {**c, "paper": paper(t)} for g, c in cells.items()} for t, cells in tasks.items()},
              "domains": domains, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records]}
    (sweep_dir / "report.json").write_text(json.dumps(result, indent=2))
    with open(sweep_dir / "report.csv", "w", newline="") as file:
        columns = ["run", "task", "grid", "seed", "status", "final_score", "last_k_score", "steps", "wall_time_s"]
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    plot_curves(finished, sweep_dir / "curves")
    print(text)
    return result


def plot_curves(finished: list[dict], folder: Path):
    """One PNG per task: per grid point, the mean over seeds and a +-1 std band, on the evaluation
    steps that every seed reached."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(exist_ok=True)
    for task in sorted({r["task"] for r in finished}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for grid in sorted({r["grid"] for r in finished if r["task"] == task}):
            curves = [dict(r["curve"]) for r in finished if r["task"] == task and r["grid"] == grid]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            scores = np.array([[c[s] for s in steps] for c in curves])
            mean, std = scores.mean(0), scores.std(0)
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{grid} ({len(curves)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        if task in PAPER_SCORES:
            ax.axhline(PAPER_SCORES[task], color="k", linestyle="--", linewidth=1, label="paper")
        ax.set(title=task, xlabel="gradient step", ylabel="normalized score x 100")
        ax.legend(fontsize=8)
        fig.savefig(folder / f"{task.strip('/').replace('/', '_')}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def main(argv: list[str]) -> int:
    opts, rest = parse_cli(argv)
    if opts.report:
        if opts.env or rest:
            raise ValueError("--report only reads a sweep folder: pass no --env or ofql.py flags with it")
        report(opts.report, opts.last_k)
        return 0
    if not opts.env:
        raise ValueError("pass --env TASK [TASK ...] (or --report SWEEP_DIR)")
    if opts.cpus_per_run <= 0 or opts.gpus_per_run < 0 or opts.max_retries < 0:
        raise ValueError("--cpus-per-run must be > 0, --gpus-per-run and --max-retries >= 0")
    base = ofql_args_from(rest)
    points = parse_grid(opts.grid, rest) or [{}]
    runs = plan_runs(opts.env, opts.seeds, points, base, threads=max(1, int(opts.cpus_per_run)))
    if opts.out is None:
        key = json.dumps([opts.env, opts.seeds, opts.grid, rest])
        opts.out = f"sweeps/sweep-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    sweep_dir = Path(opts.out).resolve()  # absolute: Ray workers on other nodes see the same path
    statuses = run_sweep(runs, base, sweep_dir, opts)
    report(sweep_dir, opts.last_k)
    return int(any(s["status"] != "done" for s in statuses.values()))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume the unfinished runs") from None
