"""OFQL against the official FQL (JAX, github.com/seohongpark/fql) on OGBench datasets kept in a local folder.

    python benchmarks/vs_fql.py train --dataset cube-single-play-v0 --seeds 0 1 2 --dataset-dir /data/ogbench
    python benchmarks/vs_fql.py speed --dataset cube-single-play-v0    # both take --fql-dir, --fql-python first
    python benchmarks/vs_fql.py rescore --runs '*eta0.3*'              # OFQL's checkpoints under other selections
    python benchmarks/vs_fql.py report                                  # -> benchmarks/results/ogbench/vs_fql.md
    python benchmarks/vs_fql.py drift --fql-runs RUN [...] --data FILE.npz  # FQL's one-step policy vs its flow

`train`: FQL (main.py, its README flags) and OFQL (ofql.py) on the same data, task, seeds and steps, 1 CPU
thread each. A finished run writes <out>/runs/<run>.json (success % at the last step, wall time, steps/s, command)
and is skipped later (`train --to-do` lists the runs still to do). A killed run resumes: OFQL with --resume; FQL from
its last params_<step>.pkl (--save-interval) with --restore_path/--restore_epoch and the remaining steps (FQL reseeds
numpy then, so its batch order starts over, and evaluates once at the restart, unused). FQL reads ogbench's
~/.ogbench/data: it runs with HOME=<work>/fql_home, whose .ogbench/data links to --dataset-dir, and a stand-in `wandb`
module first on PYTHONPATH; its eval.csv is read.
`rescore`: each finished OFQL run's checkpoint evaluated again by eval.py under --eval-protocol paper and one (50
episodes, evaluation seed 0, so the same environment resets for each), into <out>/rescored/; `report` adds them.
`speed`: steps/s at batch 256 on random data of the dataset's shapes, rounds alternating FQL (a worker process under
--fql-python) and OFQL, median reported; decisions/s at batch 1: FQL's sample_actions (its one-step policy, called
as its evaluate() does) and compute_flow_actions (10 flow steps), OFQL's act step as eval.py times it (one sample, and
--eval-protocol paper's 50 candidates scored by the target critic).

FQL's environment (its requirements.txt less D4RL, wandb and video; Python 3.11):
    git clone https://github.com/seohongpark/fql /tmp/fql/fql
    git -C /tmp/fql/fql checkout 719d04417cb0b206deddbc7d761b3e710c3d750c
    python3.11 -m venv /tmp/fql/venv
    /tmp/fql/venv/bin/pip install "ogbench==1.1.0" "jax[cpu]>=0.4.26,<0.5" flax distrax optax ml_collections absl-py \
        tqdm "numpy==1.26.4" matplotlib "gymnasium==0.29.1" "mujoco<3.4" "dm_control<1.0.36"
    (resolved here: jax/jaxlib 0.4.38, flax 0.10.4, distrax 0.1.5, tensorflow-probability 0.25.0, optax 0.2.5,
    ogbench 1.1.0, gymnasium 0.29.1, mujoco 3.3.7, dm_control 1.0.34, numpy 1.26.4)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FQL_COMMIT = "719d04417cb0b206deddbc7d761b3e710c3d750c"
DEFAULT_TASK = {"antmaze": 1, "humanoidmaze": 1, "pointmaze": 1, "antsoccer": 4, "cube": 2, "scene": 2, "puzzle": 4}
FQL_FLAGS = {  # FQL's README commands, per dataset prefix (first match)
    "antmaze-giant": ["--agent.discount=0.995", "--agent.q_agg=min", "--agent.alpha=10"],
    "antmaze": ["--agent.q_agg=min", "--agent.alpha=10"],
    "humanoidmaze": ["--agent.discount=0.995", "--agent.alpha=30"],
    "antsoccer": ["--agent.discount=0.995", "--agent.alpha=10"],
    "cube": ["--agent.alpha=300"], "scene": ["--agent.alpha=300"], "puzzle": ["--agent.alpha=1000"]}
# FQL paper Tables 2-3 (1M steps, 8 seeds, mean of the evaluations at 800k/900k/1M): default task, FQL on it, FQL's
# 5-task average, others on the default task
PUBLISHED = {"cube-single-play-v0": (2, "97 ± 2", "96 ± 1", "ReBRAC 92, IQL 85"),
             "cube-double-play-v0": (2, "36 ± 6", "29 ± 2", "ReBRAC 7, IQL 1"),
             "puzzle-3x3-play-v0": (4, "16 ± 5", "30 ± 1", "ReBRAC 2, IQL 2")}
# recorded per OFQL run; the report groups OFQL rows by them
OFQL_SETTINGS = ("eta", "eval_protocol", "critic_layer_norm", "normalize_obs", "gamma", "tau", "lr_decay", "grad_norm",
                 "hidden_dim", "adaptive_weight", "target_q", "time_sampler", "flow_ratio", "normalize_q")
# not preset keys: ofql.Args' defaults stand for the preset (and for runs recorded before the key was)
ARGS_DEFAULTS = ("time_sampler", "flow_ratio")
# older runs record these: ofql.DROPPED_OPTIONS at the values ofql.py trains as now (ofql is imported lazily here)
DROPPED = {"q_scale_running_max": False}
# named in a row only where not the preset's
UNSHOWN_SETTINGS = ("tau", "lr_decay", "grad_norm", "adaptive_weight", *ARGS_DEFAULTS, *DROPPED, "normalize_q")
RESCORED = ("paper", "one")  # the action selections `rescore` evaluates by default and `report` shows
MIN_TIME, REPEATS = 0.5, 5  # decision timing: seconds per repetition, repetitions (median)
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
WANDB_SHIM = '''"""Offline stand-in for the wandb calls FQL makes (written by OFQL's benchmarks/vs_fql.py)."""
import types
run = None
class Settings:
    def __init__(self, *args, **kwargs): pass
Image = Video = Histogram = Settings
def init(**kwargs):
    global run
    run = types.SimpleNamespace(**kwargs)
    return run
def log(*args, **kwargs): pass
finish = log
'''


def fql_flags(dataset: str) -> list[str]:
    return next((flags for prefix, flags in FQL_FLAGS.items() if dataset.startswith(prefix)), [])


def fql_env(a) -> dict:
    """FQL's process environment: one thread, the wandb stand-in first on the path, ~/.ogbench/data = the data."""
    work = Path(a.work).resolve()
    (work / "wandb_shim").mkdir(parents=True, exist_ok=True)
    (work / "wandb_shim" / "wandb.py").write_text(WANDB_SHIM)
    link = work / "fql_home" / ".ogbench" / "data"
    link.parent.mkdir(parents=True, exist_ok=True)
    if getattr(a, "dataset_dir", None):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(a.dataset_dir).resolve(), target_is_directory=True)
    return {**os.environ, **THREADS, "HOME": str(work / "fql_home"),
            "PYTHONPATH": os.pathsep.join([str(work / "wandb_shim"), str(Path(a.fql_dir).resolve())])}


def run_logged(cmd: list[str], env: dict, cwd: Path, log: Path) -> float:
    """Run cmd, its output appended to log; returns seconds. A failure prints the log's tail and stops."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        start = time.time()
        code = subprocess.call(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{tail}\nerror: exit code {code} of\n  {' '.join(cmd)}\nfull log: {log}")
    return time.time() - start


def run_ofql(a, name: str, env_name: str, seed: int) -> dict:
    run_dir = Path(a.work).resolve() / "ofql" / name
    ckpt = run_dir / "checkpoint.pt"
    command = [sys.executable, str(REPO / "ofql.py"), "--env", f"ogbench/{env_name}", "--seed", str(seed),
               "--total-steps", str(a.steps), "--eval-every", str(a.eval_every), "--eval-episodes", str(a.eval_episodes),
               "--save-every", str(a.save_interval), "--threads", "1", "--device", "cpu", "--exp-name", "vs_fql",
               "--run-dir", str(run_dir), *a.ofql_flag]
    resumed, wall = False, None
    if not (run_dir / "summary.json").exists():  # else: finished earlier, only the harness's summary is missing
        resumed = ckpt.exists()  # the checkpoint's args (threads 1 included) win
        env = {**os.environ, **THREADS, "OGBENCH_DATASET_DIR": str(Path(a.dataset_dir).resolve())}
        wall = run_logged([sys.executable, str(REPO / "ofql.py"), "--resume", str(ckpt)] if resumed else command,
                          env, REPO, run_dir / "log.txt")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"evals": {h["step"]: h["score_mean"] for h in summary["history"]},
            "returns": {h["step"]: h["return_mean"] for h in summary["history"]}, "wall_time_s": wall,
            "steps_per_s": summary["steps_per_second"], "resumed": resumed, "command": command,
            "ofql_args": {k: summary["args"][k] for k in OFQL_SETTINGS if k in summary["args"]}, "run_dir": str(run_dir)}


def ofql_config(args: dict, preset: dict, selection: bool = True) -> str:
    """The OFQL settings a report row is about, e.g. `eta 0.1, one, LN, obs-norm`; `preset`: ofql's for the dataset;
    `selection=False` leaves out the training-time action selection (re-scores act under each)."""
    others = [f"{key} {args[key]}" for key in UNSHOWN_SETTINGS if args.get(key, preset[key]) != preset[key]]  # never pooled
    protocol = [args["eval_protocol"]] if selection else []
    return ", ".join([f"eta {args['eta']}", *protocol, "LN" if args["critic_layer_norm"] else "no LN",
                      "obs-norm" if args["normalize_obs"] else "raw obs", f"gamma {args['gamma']}",
                      f"target {args.get('target_q', 'min')} of heads", f"width {args['hidden_dim']}", *others])


def fql_attempts(base: Path) -> list[tuple[int, Path]]:
    """(first step, FQL's run folder) of each attempt so far: <base>/from<step>/fql/vs_fql/sd<seed>_<time>/."""
    return sorted((int(d.name[4:]), run) for d in base.glob("from*") for run in d.glob("fql/vs_fql/sd*"))


def fql_evals(first: int, run: Path) -> dict[int, tuple[float, float]]:
    """(success %, mean episode return) by absolute step from an attempt's eval.csv (a restart's evaluation at its
    step 1 left out)."""
    lines = (run / "eval.csv").read_text().splitlines() if (run / "eval.csv").exists() else []
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    return {first + int(r["step"]): (100 * float(r["evaluation/success"]), float(r["evaluation/episode.return"]))
            for r in rows if not first or r["step"] != "1"}


def run_fql(a, name: str, env_name: str, seed: int) -> dict:
    base = Path(a.work).resolve() / "fql" / name
    evals, start, restore, wall, cmd = {}, 0, None, None, None
    for first, run in fql_attempts(base):  # earlier attempts: their evaluations and saved params
        evals.update(fql_evals(first, run))
        for params in run.glob("params_*.pkl"):
            if first + int(params.stem[7:]) > start:
                start, restore = first + int(params.stem[7:]), (run, int(params.stem[7:]))
    if a.steps not in evals:
        remaining = a.steps - start
        cmd = [a.fql_python, "main.py", f"--env_name={env_name}", *fql_flags(a.dataset), f"--seed={seed}",
               f"--offline_steps={remaining}", f"--eval_episodes={a.eval_episodes}", f"--log_interval={a.log_interval}",
               f"--eval_interval={a.eval_every if start % a.eval_every == 0 else remaining}",
               f"--save_interval={a.save_interval}", "--run_group=vs_fql", f"--save_dir={base / f'from{start}'}",
               *a.fql_flag] + ([f"--restore_path={restore[0]}", f"--restore_epoch={restore[1]}"] if restore else [])
        shutil.rmtree(base / f"from{start}", ignore_errors=True)  # an attempt from here that saved nothing later
        wall = run_logged(cmd, fql_env(a), Path(a.fql_dir), base / "log.txt")
        evals.update(fql_evals(start, next(run for first, run in fql_attempts(base) if first == start)))
    return {"evals": {step: success for step, (success, _) in evals.items()},
            "returns": {step: episode_return for step, (_, episode_return) in evals.items()},
            "wall_time_s": wall, "steps_per_s": wall and (a.steps - start) / wall,
            "resumed": start > 0, "command": cmd, "run_dir": str(base)}


def train(a):
    if a.steps % a.eval_every:
        raise SystemExit(f"--steps {a.steps} must be a multiple of --eval-every {a.eval_every}")
    out = Path(a.out) / "runs"
    tag = f"__{a.tag}" if a.tag else ""
    runs = [(seed, method, f"{method}__{a.dataset}__task{a.task}__seed{seed}__{a.steps}{tag}")
            for seed in a.seeds for method in a.methods]
    finished = [name for *_, name in runs if (out / f"{name}.json").exists()]
    to_do = [(seed, method, name) for seed, method, name in runs if name not in finished]
    if a.to_do:  # for scripts: the data is needed (made, waited for) only where a run is still to do
        print("\n".join(name for _, _, name in to_do))
        return
    for name in finished:
        print(f"skip {name}: {out / f'{name}.json'} exists")
    if not to_do:
        return
    a.dataset_dir = a.dataset_dir or os.environ.get("OGBENCH_DATASET_DIR")
    missing = [f for f in (f"{a.dataset}.npz", f"{a.dataset}-val.npz")
               if not a.dataset_dir or not (Path(a.dataset_dir) / f).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in --dataset-dir / $OGBENCH_DATASET_DIR ({a.dataset_dir}). "
                         f"Fix: python ogbench_tasks.py generate {a.dataset} --out-dir DIR (docs/ogbench.md), then "
                         "--dataset-dir DIR")
    env_name = f"{a.dataset.removesuffix('-v0')}-singletask-task{a.task}-v0"
    # which regeneration the runs train on: files regenerated on another machine have differed (docs/ogbench.md)
    data_sha256 = hashlib.sha256((Path(a.dataset_dir) / f"{a.dataset}.npz").read_bytes()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    for seed, method, name in to_do:
        print(f"run {name} (log: {Path(a.work) / method / name / 'log.txt'})", flush=True)
        result = (run_ofql if method == "ofql" else run_fql)(a, name, env_name, seed)
        if a.steps not in result["evals"]:
            raise SystemExit(f"error: {name} has no evaluation at step {a.steps} ({result['run_dir']})")
        summary = {"method": method, "dataset": a.dataset, "task": a.task, "env_name": env_name, "seed": seed,
                   "steps": a.steps, "eval_episodes": a.eval_episodes, "success": result["evals"][a.steps],
                   "return": result["returns"][a.steps],
                   **result, "fql_commit": FQL_COMMIT if method == "fql" else None,
                   "dataset_dir": str(Path(a.dataset_dir).resolve()), "data_sha256": data_sha256,
                   "finished": time.strftime("%Y-%m-%d %H:%M")}
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
        print(f"done {name}: success {summary['success']:.1f}%, {summary['wall_time_s'] or 0:.0f} s", flush=True)


def random_data(obs_dim: int, act_dim: int, n: int = 100_000) -> dict:
    """Random transitions (FQL's key names): timing needs the shapes, not the data."""
    import numpy as np
    rng = np.random.default_rng(0)
    data = {"observations": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, act_dim)),
            "rewards": -rng.integers(0, 2, n), "masks": rng.integers(0, 2, n),
            "next_observations": rng.normal(size=(n, obs_dim))}
    return {k: v.astype(np.float32) for k, v in data.items()}


def median_seconds(fn, min_time: float = MIN_TIME, repeats: int = REPEATS) -> float:
    """eval.time_calls' method on a CPU, for the FQL worker (no torch there to import eval.py with)."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time / 4:
        fn()
        count += 1
    samples, per_rep = [], max(1, count * 4)
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_rep):
            fn()
        samples.append((time.perf_counter() - start) / per_rep)
    return statistics.median(samples)


def fql_worker(a):
    """Under --fql-python: FQL's agent (its default config + README flags) on random batches of the dataset's shapes,
    driven by `speed` over stdin/stdout."""
    import jax
    import numpy as np
    import ogbench
    sys.path.insert(0, str(Path(a.fql_dir).resolve()))
    from agents.fql import FQLAgent, get_config
    env = ogbench.make_env_and_datasets(f"{a.dataset.removesuffix('-v0')}-singletask-v0", env_only=True)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    config = get_config()
    for flag in fql_flags(a.dataset):  # --agent.alpha=300 -> config.alpha = 300.0
        key, value = flag.removeprefix("--agent.").split("=")
        config[key] = type(config[key])(value)
    data = random_data(obs_dim, act_dim)
    agent = FQLAgent.create(0, data["observations"][:1], data["actions"][:1], config)

    def sample():  # as FQL's Dataset.sample: uniform indices, numpy arrays into the jitted update
        idx = np.random.randint(len(data["actions"]), size=config["batch_size"])
        return {k: v[idx] for k, v in data.items()}

    def reply(**kwargs):
        print("VSFQL " + json.dumps(kwargs), flush=True)

    for _ in range(a.warmup):
        agent, _ = agent.update(sample())
    jax.block_until_ready(agent)
    reply(obs_dim=obs_dim, act_dim=act_dim, alpha=config["alpha"], jax=jax.__version__)
    for line in sys.stdin:
        if line.startswith("train"):
            start = time.perf_counter()
            for _ in range(int(line.split()[1])):
                agent, _ = agent.update(sample())
            jax.block_until_ready(agent)
            reply(seconds=time.perf_counter() - start)
        elif line.startswith("act"):
            obs, key, noise = data["observations"][0], [jax.random.PRNGKey(0)], np.zeros((1, act_dim), np.float32)

            def one_step():  # as FQL's evaluate(): split a key, the jitted call, the action to numpy
                key[0], sub = jax.random.split(key[0])
                return np.array(agent.sample_actions(observations=obs, seed=sub, temperature=0))

            def flow():
                return np.array(agent.compute_flow_actions(obs[None], noises=noise))
            reply(rows={name: median_seconds(fn) for name, fn in (
                ("fql sample_actions (one-step policy)", one_step),
                (f"fql compute_flow_actions ({config['flow_steps']} flow steps)", flow))})
            return


def fql_drift(a):
    """Under --fql-python: benchmarks/onestep_drift.py's numbers for FQL's saved parameters (<run>/params_<step>.pkl
    and flags.json of its main.py): its one-step policy against its own BC flow (FQL's Euler sampler, its
    flow_steps) on the same noise, against the data, the mean-of-heads Q of each, and saturation; one JSON row each."""
    import pickle

    import flax
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    sys.path.insert(0, str(Path(a.fql_dir).resolve()))
    from agents.fql import FQLAgent
    data = np.load(a.data)
    rows = np.random.default_rng(a.seed).choice(len(data["observations"]), a.states, replace=False)
    obs, action = data["observations"][rows], data["actions"][rows]
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(a.seed), action.shape))
    for run in a.fql_runs:
        flags = json.loads((Path(run) / "flags.json").read_text())
        agent = FQLAgent.create(flags["seed"], obs[:1], action[:1], ml_collections.ConfigDict(flags["agent"]))
        with open(Path(run) / f"params_{a.step}.pkl", "rb") as file:
            agent = flax.serialization.from_state_dict(agent, pickle.load(file)["agent"])
        one_step = jnp.clip(agent.network.select("actor_onestep_flow")(obs, noise), -1, 1)
        flow = agent.compute_flow_actions(obs, noise)
        rms = lambda x, y: float(jnp.sqrt(((x - y) ** 2).mean()))  # noqa: E731
        q = lambda x: float(agent.network.select("critic")(obs, actions=x).mean())  # noqa: E731
        saturated = lambda x: float((jnp.abs(x) > 0.999).mean())  # noqa: E731
        print("VSFQL " + json.dumps({
            "run": run, "step": a.step, "alpha": flags["agent"]["alpha"], "rms_one_step_vs_flow": rms(one_step, flow),
            "rms_one_step_vs_data": rms(one_step, action), "rms_flow_vs_data": rms(flow, action), "q_data": q(action),
            "q_one_step": q(one_step), "q_flow": q(flow), "saturated_one_step": saturated(one_step),
            "saturated_flow": saturated(flow), "saturated_data": saturated(action)}), flush=True)


def drift(a):
    """fql_drift's rows for FQL runs, printed as benchmarks/onestep_drift.py prints OFQL checkpoints' (optional JSON)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onestep_drift
    out = subprocess.run([a.fql_python, str(Path(__file__).resolve()), "--fql-dir", a.fql_dir, "fql-drift-worker",
                          "--data", a.data, "--step", str(a.step), "--states", str(a.states), "--seed", str(a.seed),
                          "--fql-runs", *a.fql_runs], env=fql_env(a), capture_output=True, text=True)
    results = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("VSFQL ")]
    if out.returncode != 0 or len(results) != len(a.fql_runs):
        raise SystemExit(f"{out.stderr[-3000:]}\nerror: the FQL drift worker failed (exit code {out.returncode})")
    print(f"| FQL run | step | alpha | {onestep_drift.METRICS_HEADER} |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {Path(r['run']).name} | {r['step']} | {r['alpha']} | {onestep_drift.metrics_cells(r)} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"data": a.data, "states": a.states, "seed": a.seed, "runs": results},
                                           indent=2) + "\n")


def speed(a):
    import numpy as np
    import torch
    sys.path.insert(0, str(REPO))
    import eval as ofql_eval
    import ofql
    torch.set_num_threads(1)
    worker = subprocess.Popen([a.fql_python, str(Path(__file__).resolve()), "--fql-dir", a.fql_dir, "fql-worker",
                               "--dataset", a.dataset, "--warmup", str(a.warmup)], env=fql_env(a),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(command: str | None = None) -> dict:
        if command:
            worker.stdin.write(command + "\n")
            worker.stdin.flush()
        for line in worker.stdout:
            if line.startswith("VSFQL "):
                return json.loads(line[6:])
        raise SystemExit(f"error: the FQL worker stopped (exit code {worker.wait()})")

    fql_info = ask()  # FQL built and compiled before OFQL starts: one busy process at a time
    task, _ = ofql.load_task(f"ogbench/{a.dataset.removesuffix('-v0')}-singletask-v0", with_data=False)
    assert (task.obs_dim, task.act_dim) == (fql_info["obs_dim"], fql_info["act_dim"]), (task, fql_info)
    args = ofql.Args(env=task.name, device="cpu", kernels="torch", threads=1).resolved()
    raw = random_data(task.obs_dim, task.act_dim)
    data = {"obs": raw["observations"], "action": raw["actions"], "reward": raw["rewards"],
            "next_obs": raw["next_observations"], "mask": raw["masks"]}
    torch.manual_seed(0)
    buffer = ofql.ReplayBuffer(data, torch.device("cpu"), torch.Generator().manual_seed(0))
    agent = ofql.OFQL(task, args, torch.device("cpu"))

    def ofql_seconds(count: int) -> float:
        start = time.perf_counter()
        for i in range(count):
            agent.update(buffer.sample(256), swap_heads=i % 2 == 0)
        return time.perf_counter() - start

    ofql_seconds(a.warmup)
    rounds = {"fql": [], "ofql": []}
    for r in range(a.rounds):
        rounds["fql"].append(a.steps / ask(f"train {a.steps}")["seconds"])
        rounds["ofql"].append(a.steps / ofql_seconds(a.steps))
        print(f"round {r + 1}: FQL {rounds['fql'][-1]:.1f} steps/s, OFQL {rounds['ofql'][-1]:.1f} steps/s", flush=True)
    decisions = {name: 1 / s for name, s in ask("act")["rows"].items()}
    worker.wait()
    actor = agent.actor.eval()
    folded, normalizer = ofql_eval.fold(actor), ofql.Normalizer(np.zeros(task.obs_dim), np.ones(task.obs_dim))
    obs_np, numba_policy = data["obs"][:1], ofql_eval.NumbaPolicy(folded, normalizer)

    def act_step(policy):  # eval.py's act step: numpy in, normalise, act, numpy out (numba's policy does it all)
        return lambda: policy(torch.from_numpy(normalizer(obs_np)), torch.randn(1, task.act_dim)).numpy()
    with torch.no_grad():
        paper = ofql_eval.candidate_policy(actor.act, agent.critic_target.eval(), ofql_eval.PAPER_CANDIDATES)
        for name, fn in (("ofql-1 eager", act_step(actor.act)), ("ofql-1 folded", act_step(folded)),
                         ("ofql-1 numba", lambda: numba_policy(obs_np)),
                         (f"ofql paper ({ofql_eval.PAPER_CANDIDATES} cand. + critic, eager)", act_step(paper))):
            decisions[name] = 1 / ofql_eval.time_calls(fn, MIN_TIME, REPEATS, torch.device("cpu"))
    result = {"dataset": a.dataset, "obs_dim": task.obs_dim, "act_dim": task.act_dim, "batch_size": 256,
              "threads": 1, "steps_per_round": a.steps, "rounds": rounds,
              "steps_per_s": {m: statistics.median(v) for m, v in rounds.items()}, "decisions_per_s_batch1": decisions,
              "fql_alpha": fql_info["alpha"], "jax": fql_info["jax"], "torch": torch.__version__,
              "fql_commit": FQL_COMMIT, "measured": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(a.out) / f"speed_{a.dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps_per_s", "decisions_per_s_batch1")}, indent=2), f"\nwrote {path}")


def rescored_path(out: Path, run: dict, protocol: str) -> Path:
    """Where `rescore` writes, and `report` reads, a run's re-score under one action selection."""
    return out / "rescored" / f"{Path(run['run_dir']).name}__{protocol}.json"


def rescore(a):
    """Each finished OFQL run's checkpoint evaluated again under other action selections (eval.py, 50 episodes,
    evaluation seed 0: the same environment resets for every protocol): <out>/rescored/<run>__<protocol>.json."""
    sys.path.insert(0, str(REPO))
    import fnmatch

    import eval as ofql_eval
    out = Path(a.out)
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("ofql__*.json"))]
    runs = [r for r in runs if any(fnmatch.fnmatch(Path(r["run_dir"]).name, pattern) for pattern in a.runs)]
    if not runs:
        raise SystemExit(f"error: no finished OFQL run in {out / 'runs'} matches {' '.join(a.runs)}")
    (out / "rescored").mkdir(parents=True, exist_ok=True)
    for r in runs:
        name, checkpoint = Path(r["run_dir"]).name, Path(r["run_dir"]) / "checkpoint.pt"
        for protocol in a.protocols:
            path = rescored_path(out, r, protocol)
            if path.exists():
                print(f"skip {path.name}: exists")
                continue
            if not checkpoint.exists():
                raise SystemExit(f"error: {checkpoint} is missing (run {name} was trained elsewhere?): pass --runs "
                                 "patterns that leave it out")
            os.environ["OGBENCH_DATASET_DIR"] = r["dataset_dir"]
            result = ofql_eval.main(ofql_eval.EvalArgs(checkpoint=str(checkpoint), eval_protocol=protocol,
                                                       episodes=a.episodes, seeds=[0], json=str(path)))
            print(f"{name} {protocol}: {result['score_mean']:.1f}%", flush=True)


def report(a):
    sys.path.insert(0, str(REPO))
    import ofql
    out = Path(a.out)
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    speeds = [json.loads(p.read_text()) for p in sorted(out.glob("speed_*.json"))]
    groups: dict = {}
    per_task: dict = {}  # (dataset, steps, settings but the selection) -> {task: {protocol: [re-scores over seeds]}}
    for r in runs:
        by = groups.setdefault((r["dataset"], r["task"], r["steps"]), {"fql": [], "ofql": {}, "rescored": {}})
        if r["method"] == "fql":
            by["fql"].append(r)
        else:
            preset = {key: getattr(ofql.Args, key) for key in ARGS_DEFAULTS} | DROPPED | ofql.task_preset(
                f"ogbench/{r['env_name']}")
            config = ofql_config(r["ofql_args"], preset)
            by["ofql"].setdefault(config, []).append(r)
            tasks = per_task.setdefault((r["dataset"], r["steps"], ofql_config(r["ofql_args"], preset, False)), {})
            for protocol in RESCORED:
                rescored = rescored_path(out, r, protocol)
                if rescored.exists():
                    result = json.loads(rescored.read_text())
                    by["rescored"].setdefault((config, protocol), []).append(result)
                    tasks.setdefault(r["task"], {}).setdefault(protocol, []).append(result["score_mean"])

    def mean_std(v: list[float]) -> list[float] | None:  # std over seeds (population), as the table shows it
        return [round(statistics.mean(v), 1), round(statistics.pstdev(v), 1)] if v else None

    def successes(group: list[dict]) -> list[float]:
        return [r["success"] for r in group]

    def returns(group: list[dict]) -> list[float]:  # runs written before returns were recorded have none
        return [r["return"] for r in group if "return" in r]

    def fmt(v: list[float]) -> str:
        return "{:.1f} ± {:.1f} ({})".format(*mean_std(v), len(v)) if v else "—"
    lines = ["# OFQL vs FQL on OGBench (benchmarks/vs_fql.py)", "",
             "Success rate %: the evaluation at the last step (50 episodes), mean ± std over seeds (number of seeds), "
             "on regenerated datasets (docs/ogbench.md). FQL paper: Tables 2-3, 1M steps, 8 seeds, mean of the "
             "evaluations at 800k/900k/1M, on the published files.", "",
             "OFQL re-scored: the same checkpoints acting by --eval-protocol paper (50 candidates, softmax of the "
             "target Q) and one (one sample), 50 episodes, evaluation seed 0 (`vs_fql.py rescore`).", "",
             "| dataset | task | steps | OFQL | OFQL settings | OFQL re-scored: paper / one | FQL (here) | "
             "FQL paper (this task / 5-task avg) | paper, others |", "|---|---|---|---|---|---|---|---|---|"]
    rows, return_lines = [], []
    for (dataset, task, steps), by in sorted(groups.items()):
        default_task, on_task, five, others = PUBLISHED.get(dataset, (None, "—", "—", "—"))
        on_task, others = (on_task, others) if task == default_task else ("—", "—")
        fql, fql_returns = successes(by["fql"]), returns(by["fql"])
        for config, ofql_runs in sorted(by["ofql"].items()) or [("—", [])]:
            ofql, ofql_returns = successes(ofql_runs), returns(ofql_runs)
            rescores = {protocol: by["rescored"].get((config, protocol), []) for protocol in RESCORED}
            rescored = {protocol: [x["score_mean"] for x in v] for protocol, v in rescores.items()}
            rescored_returns = {protocol: [x["return_mean"] for x in v if "return_mean" in x] for protocol, v in
                                rescores.items()}
            rows.append({"dataset": dataset, "task": task, "steps": steps, "ofql": ofql, "ofql_mean_std": mean_std(ofql),
                         "ofql_settings": config, "ofql_rescored": rescored,
                         "ofql_rescored_mean_std": {k: mean_std(v) for k, v in rescored.items()},
                         "fql": fql, "fql_mean_std": mean_std(fql),
                         "ofql_return_mean_std": mean_std(ofql_returns), "fql_return_mean_std": mean_std(fql_returns),
                         "ofql_rescored_return_mean_std": {k: mean_std(v) for k, v in rescored_returns.items()},
                         "fql_paper_task": on_task, "fql_paper_5task": five})
            lines.append(f"| {dataset} | task{task} | {steps:,} | {fmt(ofql)} | {config} | "
                         f"{' / '.join(fmt(v) for v in rescored.values())} | {fmt(fql)} | "
                         f"{on_task} / {five} | {others} |")
            if ofql_returns and fql_returns:
                return_lines.append(f"| {dataset} | task{task} | {steps:,} | {config} | {fmt(ofql_returns)} | "
                                    f"{' / '.join(fmt(v) for v in rescored_returns.values())} | {fmt(fql_returns)} |")
    if return_lines:
        lines += ["", "Mean episode return at the last evaluation, mean ± std over seeds. OGBench's single-task reward "
                  "is 0 once the task is solved and negative before (cube, scene, puzzle: minus the subtasks not yet "
                  "solved, each step), so where both methods score 0% the higher return got closer.",
                  "", "| dataset | task | steps | OFQL settings | OFQL return | OFQL re-scored: " + " / ".join(RESCORED)
                  + " | FQL return |", "|---|---|---|---|---|---|---|",
                  *return_lines]
    task_rows, task_lines = [], []
    for (dataset, steps, config), tasks in sorted(per_task.items()):
        if len(tasks) < 2:
            continue
        means = {task: {p: statistics.mean(v) for p, v in scores.items()} for task, scores in tasks.items()}
        stds = {task: {p: round(statistics.pstdev(v), 1) for p, v in scores.items() if len(v) > 1}
                for task, scores in tasks.items()}  # over seeds, where a task has more than one
        all_five = sorted(means) == [1, 2, 3, 4, 5] and all(len(m) == len(RESCORED) for m in means.values())
        five = {p: round(statistics.mean(m[p] for m in means.values()), 1) for p in RESCORED} if all_five else None
        seeds = {task: max(map(len, scores.values())) for task, scores in tasks.items()}
        paper_five = PUBLISHED.get(dataset, (None, "—", "—"))[2]
        task_rows.append({"dataset": dataset, "steps": steps, "ofql_settings": config, "tasks": means, "seeds": seeds,
                          "stds": stds, "five_task_mean": five, "fql_paper_5task": paper_five})

        def cell(t: int, p: str) -> str:
            return "—" if p not in means[t] else f"{means[t][p]:.1f}" + (f" ± {stds[t][p]}" if p in stds[t] else "")
        cells = [" / ".join(cell(t, p) for p in RESCORED) + f" ({seeds[t]})" if t in means else "—"
                 for t in range(1, 6)]
        five_cell = " / ".join(f"{five[p]:.1f}" for p in RESCORED) if five else "—"
        task_lines.append(f"| {dataset} | {steps:,} | {config} | {' | '.join(cells)} | {five_cell} | {paper_five} |")
    if task_rows:
        lines += ["", "OFQL on each task of a dataset, re-scored (" + " / ".join(RESCORED) + "; mean over the task's "
                  "seeds ± their std where more than one, their number in brackets; `vs_fql.py rescore`), and the "
                  "mean over the five tasks where all five ran; FQL's paper gives its 5-task average at 1M steps.", "",
                  "| dataset | steps | OFQL settings (any selection) | task1 | task2 | task3 | task4 | task5 | "
                  "5-task mean | FQL paper 5-task avg |", "|---|---|---|---|---|---|---|---|---|---|",
                  *task_lines]
    if speeds:
        lines += ["", "Speed on this CPU, 1 thread: gradient steps/s at batch 256 (median of interleaved rounds), "
                  "decisions/s at batch 1.", "", "| dataset | FQL steps/s | OFQL steps/s | decisions/s |",
                  "|---|---|---|---|"]
        lines += [f"| {s['dataset']} | {s['steps_per_s']['fql']:.1f} | {s['steps_per_s']['ofql']:.1f} | " +
                  ", ".join(f"{k}: {v:,.0f}" for k, v in s["decisions_per_s_batch1"].items()) + " |" for s in speeds]
    files: dict = {}  # (dataset, sha256 prefix) -> {method: runs}
    for r in runs:
        key = (r["dataset"], r["data_sha256"][:8] if "data_sha256" in r else "unrecorded")
        files.setdefault(key, {"fql": 0, "ofql": 0})[r["method"]] += 1
    lines += ["", "Training files: the sha256 (first 8 hex digits) of each dataset's training file and how many runs of "
              "each method used it. Where a dataset has two files, runs on different ones are different draws of "
              "the same procedure, not a same-file comparison.", "", "| dataset | sha256 | OFQL runs | FQL runs |",
              "|---|---|---|---|", *(f"| {d} | {h} | {n['ofql']} | {n['fql']} |" for (d, h), n in sorted(files.items()))]
    report_json = {"rows": rows, "per_task": task_rows, "speed": speeds, "runs": runs,
                   "files": [{"dataset": d, "sha256_prefix": h, **n} for (d, h), n in sorted(files.items())]}
    (out / "vs_fql.json").write_text(json.dumps(report_json, indent=2, ensure_ascii=False))
    (out / "vs_fql.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwrote {out / 'vs_fql.md'} and {out / 'vs_fql.json'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fql-dir", default="/tmp/fql/fql", help="checkout of github.com/seohongpark/fql")
    p.add_argument("--fql-python", default="/tmp/fql/venv/bin/python", help="Python of FQL's environment")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/ogbench"), help="summaries, speed, report")
    p.add_argument("--work", default=str(REPO / "runs/vs_fql"), help="run folders, logs, FQL's HOME and wandb shim")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="FQL and OFQL runs, one JSON each under <out>/runs/")
    t.add_argument("--dataset", default="cube-single-play-v0", help="OGBench file stem, e.g. puzzle-3x3-play-v0")
    t.add_argument("--task", type=int, default=None, help="task number (default: the dataset's default task)")
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--steps", type=int, default=1_000_000)
    t.add_argument("--eval-every", type=int, default=None, help="evaluation interval (default: --steps)")
    t.add_argument("--eval-episodes", type=int, default=50)
    t.add_argument("--save-interval", type=int, default=10_000, help="checkpoint interval of both (resume points)")
    t.add_argument("--log-interval", type=int, default=5000, help="FQL's train.csv interval")
    t.add_argument("--methods", nargs="+", choices=("ofql", "fql"), default=["ofql", "fql"])
    t.add_argument("--dataset-dir", default=None, help="folder with <dataset>.npz (default: $OGBENCH_DATASET_DIR)")
    t.add_argument("--fql-flag", action="append", default=[], help="extra flag for FQL's main.py (repeatable)")
    t.add_argument("--ofql-flag", action="append", default=[], help="extra flag for ofql.py, e.g. --ofql-flag=--eta=0.3")
    t.add_argument("--tag", default="", help="suffix of the run names (runs with other --ofql-flag need their own)")
    t.add_argument("--to-do", action="store_true", help="print the names of the runs not finished yet and exit")
    for name in ("speed", "fql-worker"):
        s = sub.add_parser(name, help="steps/s and decisions/s of both" if name == "speed" else argparse.SUPPRESS)
        s.add_argument("--dataset", default="cube-single-play-v0")
        s.add_argument("--steps", type=int, default=300, help="gradient steps per timed round")
        s.add_argument("--rounds", type=int, default=3)
        s.add_argument("--warmup", type=int, default=20, help="untimed steps first (FQL: compilation)")
    for name in ("drift", "fql-drift-worker"):
        d = sub.add_parser(name, help="FQL's one-step policy against its own flow (as benchmarks/onestep_drift.py)"
                           if name == "drift" else argparse.SUPPRESS)
        d.add_argument("--fql-runs", nargs="+", required=True, help="FQL run folders (flags.json, params_<step>.pkl)")
        d.add_argument("--data", required=True, help="an OGBench .npz file (its validation split, e.g.)")
        d.add_argument("--step", type=int, default=50_000, help="which params_<step>.pkl")
        d.add_argument("--states", type=int, default=2048)
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--json", help="also write the rows here")
    r = sub.add_parser("rescore", help="finished OFQL runs evaluated again under other action selections")
    r.add_argument("--runs", nargs="+", default=["*"], help="run folder names or patterns (default: every OFQL run)")
    r.add_argument("--protocols", nargs="+", default=list(RESCORED), choices=("paper", "argmax", "one", "deterministic"))
    r.add_argument("--episodes", type=int, default=50)
    sub.add_parser("report", help="<out>/vs_fql.md and .json from the run summaries, re-scores and speed files")
    a = p.parse_args()
    if a.command == "train":
        a.task = a.task or DEFAULT_TASK[a.dataset.split("-")[0]]
        a.eval_every = a.eval_every or a.steps
    {"train": train, "rescore": rescore, "speed": speed, "fql-worker": fql_worker, "drift": drift,
     "fql-drift-worker": fql_drift, "report": report}[a.command](a)


if __name__ == "__main__":
    main()
