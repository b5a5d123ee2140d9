"""OGBench's single-task datasets for ofql.py, and their regeneration offline (docs/ogbench.md).

    pip install -r requirements-ogbench.txt
    python ofql.py --env ogbench/cube-single-play-singletask-task1-v0       # every ofql.py flag; eval.py, sweep.py too
    python ogbench_tasks.py generate cube-single-play-v0 --workers 2         # OGBench's oracles, no download

A leaf, like ofql_data.py: it imports no project file, and ofql.load_task imports it for `ogbench/` names only, so
the optional `ogbench` package is needed only there (it is imported inside the functions that use it). It returns
plain data (`load_task`: task fields as a dict, transitions as numpy arrays; `task_settings`: the OGBench preset, FQL's
critic LayerNorm and discount, the paper's candidate selection). It reads the data as FQL does. `generate` rewrites
a manipulation dataset (cube, scene, puzzle) with the scripted oracles the `ogbench` package ships, by OGBench's
published procedure: another draw of the same distribution, not the published file. Training moved to ofql.py:
`python ogbench_tasks.py --env ...` answers with the ofql.py command.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro


def task_settings(name: str) -> tuple[str, dict]:
    """("ogbench", settings) for ofql.task_preset: FQL's critic LayerNorm, the paper's 50-candidate selection (one
    sample scored far lower on cube-single and puzzle-3x3, docs/ogbench.md; eta: ofql.py's MuJoCo default) and FQL's
    discount: 0.995 where FQL used it (antmaze-giant, humanoidmaze-medium/large, antsoccer-arena), extended to the
    other giant and humanoid mazes and antsoccer-medium, else 0.99 (docs/ogbench.md)."""
    name = name.removeprefix("ogbench/")
    gamma = 0.995 if name.startswith(("humanoidmaze-", "antsoccer-")) or "maze-giant-" in name else 0.99
    return "ogbench", {"critic_layer_norm": True, "eval_protocol": "paper", "gamma": gamma}


def dataset_folder(out_dir: str | None = None) -> Path:
    """Where OGBench files are read and written: out_dir, else $OGBENCH_DATASET_DIR, else ogbench's ~/.ogbench/data."""
    return Path(out_dir or os.environ.get("OGBENCH_DATASET_DIR", "~/.ogbench/data")).expanduser()


def load_task(name: str, with_data: bool = True, d4rl_mirror: str | None = None):
    """ofql.load_task's entry, as ofql_data.load_task's (d4rl_mirror unused): load_ogbench."""
    return load_ogbench(name, with_data)


def load_ogbench(name: str, with_data: bool = True) -> tuple[dict, dict[str, np.ndarray] | None]:
    """`ogbench/<dataset>` through ogbench.make_env_and_datasets, read as FQL reads it (docs/ogbench.md): its rewards
    and `masks` (its `terminals` only end trajectories, never crossed by a transition); score 100 x info['success']
    at episode end; files in OGBENCH_DATASET_DIR (default: ~/.ogbench/data), downloaded there when missing. Returns
    (ofql.Task's fields but its name, transitions), as ofql_data.load_task does."""
    try:
        import ogbench
    except ImportError as err:
        raise ValueError(f"--env {name} needs the optional ogbench package ({err}). Fix: pip install -r "
                         "requirements-ogbench.txt (Python <= 3.12: its dm_control needs labmaze wheels)") from err
    dataset, parts = name.removeprefix("ogbench/"), name.removeprefix("ogbench/").split("-")
    if "singletask" not in parts or parts[0] == "visual":
        raise ValueError(f"'{name}' is not an OGBench state-based single-task dataset: names look like ogbench/"
                         "<env>-<data>-singletask[-taskN]-v0, e.g. ogbench/cube-single-play-singletask-task1-v0")
    make_env = lambda **kwargs: ogbench.make_env_and_datasets(dataset, env_only=True, **kwargs)  # noqa: E731
    try:
        env = make_env()
    except gym.error.Error as err:
        raise ValueError(f"'{name}': OGBench has no such environment ({err}); see docs/ogbench.md") from err
    task = {"obs_dim": env.observation_space.shape[0], "act_dim": env.action_space.shape[0], "make_env": make_env,
            "ref_min": 0.0, "ref_max": 1.0, "score_key": "success",
            "ref_source": "OGBench: 100 x success rate (info['success'] at episode end, as FQL reports)"}
    env.close()
    if not with_data:
        return task, None
    folder = dataset_folder()
    try:
        env, data, _ = ogbench.make_env_and_datasets(dataset, dataset_dir=str(folder))  # (env, train, validation)
    except OSError as err:  # offline (URLError), a name the server lacks (HTTPError), an unwritable folder
        stem = "-".join(parts[:parts.index("singletask")] + parts[-1:])  # ogbench's file: no singletask/taskN
        raise FileNotFoundError(
            f"OGBench dataset {stem} ({stem}.npz and {stem}-val.npz) is not in OGBENCH_DATASET_DIR={folder} and "
            f"could not be downloaded ({err}). Fix: on a connected machine run `python -c \"import ogbench; "
            f"ogbench.download_datasets(['{stem}'])\"` and copy both files from ~/.ogbench/data into {folder}, or "
            f"fetch them from {ogbench.utils.DATASET_URL}/") from err
    env.close()
    return task, {"obs": data["observations"], "action": np.clip(data["actions"], -1, 1), "reward": data["rewards"],
                  "next_obs": data["next_observations"], "mask": data["masks"]}


# ---- Regeneration of the manipulation datasets (OGBench's data_gen_scripts/generate_manipspace.py procedure) ------
EPISODE_STEPS = 1001  # OGBench's --max_episode_steps for every manipulation dataset
CHUNK_EPISODES = 10  # episodes per resumable chunk; part of a file's identity (the seeds are drawn per chunk)
STACK_PROBABILITY = {"single": (0.0, 0.0), "double": (0.0, 0.25), "triple": (0.05, 0.35), "quadruple": (0.1, 0.5)}


@dataclass(frozen=True)
class Recipe:
    """How OGBench made `<env>-<play|noisy>-v0`: its commands.sh settings for that dataset."""

    dataset: str
    env_id: str  # the data-collection environment, e.g. cube-single-v0
    oracle: str  # `plan` (play: non-Markovian, smoothed noise) or `markov` (noisy: closed loop, Gaussian noise)
    train_episodes: int  # validation: a tenth as many, drawn after them
    p_random_action: float  # noisy only: a uniform random action instead of the oracle's

    @classmethod
    def of(cls, dataset: str) -> Recipe:
        parts = dataset.split("-")
        known = [f"{e}-{k}-v0" for e in ("cube-single", "cube-double", "cube-triple", "cube-quadruple", "scene",
                                        "puzzle-3x3", "puzzle-4x4", "puzzle-4x5", "puzzle-4x6") for k in ("play", "noisy")]
        if dataset not in known:
            close = difflib.get_close_matches(dataset, known, n=1)
            raise ValueError(f"cannot generate '{dataset}': `generate` makes OGBench's manipulation datasets "
                             f"({', '.join(known)})" + (f"; did you mean {close[0]}?" if close else ""))
        kind, env_id = parts[-2], "-".join(parts[:-2] + ["v0"])
        many = {"cube-triple": 3000, "puzzle-4x5": 3000, "cube-quadruple": 5000, "puzzle-4x6": 5000}
        return cls(dataset, env_id, "plan" if kind == "play" else "markov", many.get("-".join(parts[:-2]), 1000),
                   0.0 if kind == "play" else 0.2 if parts[0] == "puzzle" else 0.1)


def make_oracles(recipe: Recipe, env) -> dict:
    """OGBench's oracles per subtask: plan oracles with noise 0.1 / smoothing 0.5 (play), Markov oracles with min_norm
    0.4 (noisy; scene's cube oracle gives up after 100 steps); puzzle presses buttons with the gripper closed."""
    from ogbench.manipspace.oracles.markov import button_markov, cube_markov, drawer_markov, window_markov
    from ogbench.manipspace.oracles.plan import button_plan, cube_plan, drawer_plan, window_plan

    if recipe.oracle == "plan":
        kw = dict(env=env, noise=0.1, noise_smoothing=0.5)
        cube, button = cube_plan.CubePlanOracle, button_plan.ButtonPlanOracle
        drawer, window = drawer_plan.DrawerPlanOracle, window_plan.WindowPlanOracle
    else:
        kw = dict(env=env, min_norm=0.4)
        cube, button = cube_markov.CubeMarkovOracle, button_markov.ButtonMarkovOracle
        drawer, window = drawer_markov.DrawerMarkovOracle, window_markov.WindowMarkovOracle
    if recipe.env_id.startswith("cube"):
        return {"cube": cube(**kw)}
    if recipe.env_id.startswith("puzzle"):
        return {"button": button(**kw, gripper_always_closed=True)}
    return {"cube": cube(**kw, **({"max_step": 100} if recipe.oracle == "markov" else {})), "button": button(**kw),
            "drawer": drawer(**kw), "window": window(**kw)}


def scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's check: the cube stays in view (not too far right, and not too far left unless in the drawer)."""
    y, z = qpos[:, 15], qpos[:, 16]
    return not ((y >= 0.29).any() or ((y <= -0.3) & ((z < 0.06) | (z > 0.08))).any())


def run_episode(recipe: Recipe, env, oracles: dict) -> dict[str, np.ndarray]:
    """One data-collection episode (until the env's time limit); the oracle takes a new random subtask whenever it is
    done."""
    p_stack = np.random.uniform(*STACK_PROBABILITY[recipe.env_id.split("-")[1]]) if recipe.env_id.startswith("cube") \
        else 0.5
    noise = np.random.uniform(0, 0.1) if recipe.oracle == "markov" else 0.0  # this episode's noise level xi
    ob, info = env.reset()
    agent = oracles[info["privileged/target_task"]]
    agent.reset(ob, info)
    rows, done = [], False
    while not done:
        if np.random.rand() < recipe.p_random_action:  # OGBench's action_space.sample(), from the seeded RNG: the
            action = np.random.uniform(-1, 1, 5).astype(np.float32)  # env builds a new, unseeded Box per access
        else:
            action = np.array(agent.select_action(ob, info))
            if recipe.oracle == "markov":  # per-dimension scale (1, 1, 1, 3, 10): xyz, yaw, gripper
                action = action + np.random.normal(0, [noise, noise, noise, noise * 3, noise * 10], action.shape)
        action = np.clip(action, -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent = oracles[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        rows.append((ob, action, done, info["prev_qpos"], info["prev_qvel"], info.get("prev_button_states")))
        ob = next_ob
    columns = dict(zip(("observations", "actions", "terminals", "qpos", "qvel", "button_states"), zip(*rows)))
    if columns["button_states"][0] is None:
        del columns["button_states"]
    dtypes = {"terminals": bool, "button_states": np.int64}
    return {k: np.array(v, dtype=dtypes.get(k, np.float32)) for k, v in columns.items()}


def generate_chunk(recipe: Recipe, seed: int, chunk: int, episodes: int, episode_steps: int, path: Path) -> int:
    """Episodes [chunk * CHUNK_EPISODES, + episodes) into `path` (atomically). The chunk's RNGs (numpy's global one,
    which the oracles and OGBench's script use, and the env's) come from (seed, chunk) alone, so a chunk is the same
    whichever worker makes it and whenever."""
    import ogbench.manipspace  # noqa: F401  (registers the data-collection environments)

    # A fresh env and oracles per chunk (~1 s): nothing a previous chunk left behind (simulator or oracle state) can
    # reach this one's draws
    env = gym.make(recipe.env_id, terminate_at_goal=False, mode="data_collection", max_episode_steps=episode_steps)
    oracles = make_oracles(recipe, env)
    entropy = np.random.SeedSequence([seed, chunk]).generate_state(2)
    np.random.seed(entropy[0])
    env.reset(seed=int(entropy[1]))
    made = []
    while len(made) < episodes:
        episode = run_episode(recipe, env, oracles)
        if recipe.env_id.startswith("scene") and not scene_episode_is_healthy(episode["qpos"]):
            continue  # OGBench re-draws such an episode
        made.append(episode)
    env.close()
    write_npz(path, {k: np.concatenate([e[k] for e in made]) for k in made[0]}, compress=False)
    return episodes


def write_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = True):
    """np.savez(_compressed) with fixed zip timestamps (numpy stamps the time of writing), so the same arrays give the
    same bytes; written to a temporary name and renamed, so a killed write leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=mode) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = mode
            with archive.open(info, "w", force_zip64=True) as file:
                np.lib.format.write_array(file, np.asanyarray(value), allow_pickle=False)
    os.replace(tmp, path)


@dataclass
class GenerateArgs:
    """Regenerate an OGBench manipulation dataset with OGBench's oracles (docs/ogbench.md, "Regenerating data")."""

    dataset: tyro.conf.Positional[str]
    """e.g. cube-single-play-v0: cube-{single,double,triple,quadruple}, scene, puzzle-{3x3,4x4,4x5,4x6}; play/noisy"""
    seed: int = 0
    """the same seed gives byte-identical files, whatever --workers"""
    workers: int = 1
    """worker processes (one MuJoCo simulation each)"""
    out_dir: str | None = None
    """where <dataset>.npz and <dataset>-val.npz go (None: $OGBENCH_DATASET_DIR, else ~/.ogbench/data)"""
    episodes: int | None = None
    """training episodes (None: OGBench's: 1000; 3000 for cube-triple and puzzle-4x5; 5000 for cube-quadruple and
    puzzle-4x6); validation draws a tenth as many (at least one). Small values make test files"""
    episode_steps: int = EPISODE_STEPS
    """steps per episode (OGBench: 1001); shorter only for test files"""


def generate(args: GenerateArgs) -> tuple[Path, Path]:
    """Write <dataset>.npz and <dataset>-val.npz. Chunks of CHUNK_EPISODES episodes go to a hidden folder next to them
    as they finish, so a killed generation resumes where it stopped; the folder is removed once both files exist."""
    from tqdm import tqdm

    recipe = Recipe.of(args.dataset)
    train = recipe.train_episodes if args.episodes is None else args.episodes
    if train < 1 or args.workers < 1 or args.episode_steps < 2:
        raise ValueError("--episodes and --workers must be >= 1 and --episode-steps >= 2")
    total = train + max(train // 10, 1)
    folder = dataset_folder(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{recipe.dataset}.npz", folder / f"{recipe.dataset}-val.npz"
    work = folder / f".{recipe.dataset}-chunks"
    identity = {"recipe": dataclasses.asdict(recipe), "seed": args.seed, "train_episodes": train, "episodes": total,
                "episode_steps": args.episode_steps, "chunk_episodes": CHUNK_EPISODES}
    work.mkdir(exist_ok=True)
    manifest = work / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) != identity:
        raise ValueError(f"{work} holds chunks of another generation ({manifest.read_text()}); delete that folder to "
                         "start over, or rerun with its settings to resume it")
    manifest.write_text(json.dumps(identity))
    sizes = [min(CHUNK_EPISODES, total - start) for start in range(0, total, CHUNK_EPISODES)]
    chunk_paths = [work / f"chunk-{c:05d}.npz" for c in range(len(sizes))]
    todo = [c for c, path in enumerate(chunk_paths) if not path.exists()]
    jobs = [(recipe, args.seed, c, sizes[c], args.episode_steps, chunk_paths[c]) for c in todo]
    with tqdm(total=total, initial=total - sum(sizes[c] for c in todo), unit="episode",
              desc=f"generating {recipe.dataset}") as progress:
        if args.workers == 1:
            for job in jobs:
                progress.update(generate_chunk(*job))
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(args.workers, len(jobs) or 1)) as pool:
                for done in pool.imap_unordered(generate_chunk_job, jobs):
                    progress.update(done)
    chunks = [dict(np.load(path)) for path in chunk_paths]
    data = {k: np.concatenate([chunk[k] for chunk in chunks]) for k in chunks[0]}
    split = train * args.episode_steps  # OGBench: the first episodes train, the last tenth validates
    write_npz(paths[0], {k: v[:split] for k, v in data.items()})
    write_npz(paths[1], {k: v[split:] for k, v in data.items()})
    shutil.rmtree(work)
    return paths


def generate_chunk_job(job: tuple) -> int:
    return generate_chunk(*job)


if __name__ == "__main__":
    if sys.argv[1:2] == ["generate"]:
        try:
            for written in generate(tyro.cli(GenerateArgs, args=sys.argv[2:], prog="ogbench_tasks.py generate")):
                print(f"wrote {written}")
        except ValueError as err:
            sys.exit(f"error: {err}")
    else:  # training moved to ofql.py, which this leaf never imports
        sys.exit("error: OGBench datasets train through ofql.py: python ofql.py " + shlex.join(sys.argv[1:]) +
                 " (every flag as before; regenerate data with python ogbench_tasks.py generate <dataset>)")
