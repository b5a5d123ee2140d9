"""The dataset families of ofql.py's task names (docs/data.md): D4RL's MuJoCo v2 files (download, integrity check,
HDF5 -> Minari conversion), Minari datasets by id or folder (AntMaze and Kitchen with D4RL's conventions), and the
built-in tasks (the Pendulum data builder, the bandit). OGBench's family is ogbench_tasks.py.

A leaf: it imports no project file, and ofql.py imports it only where it resolves a task name (ofql.load_task), so
ofql.py copied alone still trains on in-memory data (ofql.train(args, data=...), docs/own_data.md). What it returns is
plain: `load_task(name)` -> (task fields as a dict, transitions as numpy arrays), which ofql.py turns into its Task.
"""
from __future__ import annotations

import difflib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

D4RL_MUJOCO = {f"{env}-{level}-v2": (env, level) for env in ("halfcheetah", "hopper", "walker2d")
               for level in ("medium", "medium-replay", "medium-expert")}
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
D4RL_EVAL_ENV = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"  # D4RL's only server
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
BANDIT_STD = 0.05  # std of each Gaussian mode of bandit-8modes
# Minari's D4RL/antmaze and D4RL/kitchen are regenerated on the newer gymnasium-robotics envs: not the paper's data
MINARI_SOURCE = {
    **{f"antmaze-{m}-v0": f"D4RL/antmaze/{m}-v1" for m in
       ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")},
    **{f"kitchen-{m}-v0": f"D4RL/kitchen/{m}-v2" for m in ("complete", "partial", "mixed")},
    "pendulum-swingup": "ofql/pendulum/swingup-noisy-v0",
}


# DQL's main.py table by task: grad clip, and on AntMaze and Kitchen eta, max-Q backup, lr and steps, which ofql.py's
# presets keep (task_settings, ofql.task_preset; DQL's MuJoCo eta, 1.0, is not OFQL's: docs/algorithm.md)
DQL_SETTINGS = {
    **{name: {"grad_norm": clip} for name, clip in {
        "halfcheetah-medium-v2": 9, "hopper-medium-v2": 9, "walker2d-medium-v2": 1, "halfcheetah-medium-replay-v2": 2,
        "hopper-medium-replay-v2": 4, "walker2d-medium-replay-v2": 4, "halfcheetah-medium-expert-v2": 7,
        "hopper-medium-expert-v2": 5, "walker2d-medium-expert-v2": 5}.items()},
    **{f"antmaze-{maze}-v0": {"eta": eta, "grad_norm": clip, "max_q_backup": max_q, "lr": lr}
       for maze, (eta, clip, max_q, lr) in {
           "umaze": (0.5, 2, False, 3e-4), "umaze-diverse": (2.0, 3, True, 3e-4), "medium-play": (2.0, 2, True, 1e-3),
           "medium-diverse": (3.0, 1, True, 3e-4), "large-play": (4.5, 10, True, 3e-4),
           "large-diverse": (3.5, 7, True, 3e-4)}.items()},
    **{f"kitchen-{task}-v0": {"eta": 0.005, "grad_norm": clip, "total_steps": steps}  # DQL stops complete at 250k
       for task, (clip, steps) in {"complete": (9, 250_000), "partial": (10, 1_000_000), "mixed": (10, 1_000_000)}.items()},
}


# OFQL's settings of this module's families but `mujoco` (ofql.py's own), under DQL's row of the task (built-ins'
# measured, docs/calibration.md)
FAMILY_SETTINGS = {
    "antmaze": {"reward_scale": 4.0, "reward_bias": -0.5, "eval_protocol": "paper"},  # DQL's reward (r - 0.5) * 4
    "kitchen": {"eval_protocol": "paper"},
    # built-in tasks (no download); the bandit (one-step episodes): its critic must resolve 0.15-wide reward windows,
    # so no lr decay
    "bandit": {"eta": 0.3, "lr": 1e-3, "critic_lr": 1e-3, "lr_decay": False, "grad_norm": 0.0, "total_steps": 2000,
               "eval_every": 500, "hidden_dim": 128, "eval_protocol": "one", "eval_episodes": 1000},
    "pendulum": {"eta": 3.0, "total_steps": 6000, "eval_every": 1000},
}


def task_settings(name: str) -> tuple[str, dict]:
    """(family, settings) of a task name for ofql.task_preset: `bandit`, `pendulum`, `antmaze` or `kitchen` (D4RL's
    names, Minari's D4RL/antmaze/* and D4RL/kitchen/* ids and their folders: DQL's row of the same maze or task), else
    `mujoco`; settings: the family's (FAMILY_SETTINGS), then DQL's row of the task (DQL_SETTINGS)."""
    if name in ("bandit-8modes", "pendulum-swingup"):
        family = name.split("-")[0]
        return family, dict(FAMILY_SETTINGS[family])
    family = next((f for f in ("antmaze", "kitchen") if name.startswith(f + "-") or f"/{f}/" in f"/{name}"), "mujoco")
    if family != "mujoco" and name not in DQL_SETTINGS:  # D4RL/antmaze/medium-play-v1 -> antmaze-medium-play-v0
        name = f"{family}-{Path(name.rstrip('/')).name.rsplit('-v', 1)[0]}-v0"
    return family, FAMILY_SETTINGS.get(family, {}) | DQL_SETTINGS.get(name, {})


@dataclass(frozen=True)
class Convention:
    """How a dataset family is read and scored (D4RL's conventions, docs/data.md)."""

    obs_keys: tuple[str, ...] = ()  # dict observation entries concatenated, in this order
    terminal_from_reward: bool = False  # AntMaze v1 never terminates: terminal = reward > 0 as in D4RL
    eval_kwargs: tuple[tuple[str, object], ...] = ()  # gym.make overrides of the eval env
    ref: tuple[float, float] | None = None  # (min, max) for the normalized score
    ref_note: str = ""


CONVENTIONS = {
    "antmaze": Convention(("achieved_goal", "observation"), True, (("continuing_task", False),), (0.0, 1.0),
                          "D4RL antmaze: 100 x success rate (Minari regeneration, not the paper's data)"),
    "kitchen": Convention(("observation",), False, (("remove_task_when_completed", True),
                                                    ("terminate_on_tasks_completed", True), ("max_episode_steps", 280)),
                          (0.0, 4.0), "D4RL kitchen: 100 x return / 4 (Minari regeneration, not the paper's data)"),
}



def flatten_obs(obs, keys: tuple[str, ...]) -> np.ndarray:
    """A dict observation (or a batch of them) as one array: the `keys` entries side by side."""
    if not keys:
        return np.asarray(obs, dtype=np.float64)
    return np.concatenate([np.asarray(obs[k], dtype=np.float64) for k in keys], -1)


def episodes_to_transitions(episodes, obs_keys: tuple[str, ...] = (), source: str = "dataset") -> dict[str, np.ndarray]:
    """Minari episodes (N + 1 observations each) -> flat transitions; truncation is never a terminal (the last
    transition of a time-limited episode bootstraps). NaN/Inf is refused with its count and first episode."""
    parts = {"obs": [], "action": [], "reward": [], "next_obs": [], "mask": []}
    bad_count, first_bad = {}, {}
    for ep in episodes:
        obs = flatten_obs(ep.observations, obs_keys)
        fields = {"obs": obs, "action": np.asarray(ep.actions, dtype=np.float64).reshape(len(ep.actions), -1),
                  "reward": np.asarray(ep.rewards, dtype=np.float64)}
        for key, value in fields.items():
            if count := int((~np.isfinite(value)).sum()):
                bad_count[key] = bad_count.get(key, 0) + count
                first_bad.setdefault(key, ep.id)
        fields |= {"obs": obs[:-1], "next_obs": obs[1:], "mask": 1.0 - np.asarray(ep.terminations, dtype=np.float64)}
        for key, value in fields.items():
            parts[key].append(value)
    if bad_count:
        raise ValueError(f"{source}: " + "; ".join(f"'{k}' has {n} NaN/Inf values (first in episode {first_bad[k]})"
                                                   for k, n in bad_count.items()) + "; clean the dataset before training")
    return {k: np.concatenate(v) for k, v in parts.items()}


def pendulum_controller(obs: np.ndarray) -> np.ndarray:
    """Energy-pumping swing-up with a PD catch near the top (Pendulum-v1: theta = 0 is upright,
    theta'' = 15 sin(theta) + 3 u, so E = w^2 / 2 + 15 cos(theta) is 15 at rest on top)."""
    cos, sin, w = obs[..., 0], obs[..., 1], obs[..., 2]
    energy = 0.5 * w**2 + 15.0 * cos
    pump = 0.5 * (15.0 - energy) * w
    hold = -(12.0 * np.arctan2(sin, cos) + 3.0 * w)
    return np.clip(np.where(cos > 0.85, hold, pump), -2.0, 2.0)[..., None]


def build_pendulum_dataset(dataset_id: str, episodes: int = 100, seed: int = 0):
    """Write the built-in Pendulum-v1 dataset: a noisy swing-up controller (Gaussian noise std 1.5,
    and a uniform random torque half of the time) scores ~45; refs: random policy 0, clean controller 100."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env, rng = gym.make("Pendulum-v1"), np.random.default_rng(seed)

    def rollout(policy, episode_seed):
        obs, _ = env.reset(seed=episode_seed)
        buf = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = policy(obs).astype(np.float32)
            obs, reward, term, trunc, _ = env.step(action)
            for key, val in zip(buf, (obs, action, reward, term, trunc)):
                buf[key].append(val)
            done = term or trunc
        return buf

    def behaviour(obs):
        if rng.random() < 0.5:
            return rng.uniform(-2, 2, size=1)
        return np.clip(pendulum_controller(obs) + 1.5 * rng.normal(size=1), -2, 2)

    buffers = [EpisodeBuffer(id=i, **{k: np.asarray(v) for k, v in rollout(behaviour, seed * 10_000 + i).items()})
               for i in range(episodes)]
    n = 50  # reference episodes
    ref_max = np.mean([sum(rollout(pendulum_controller, 10**6 + i)["rewards"]) for i in range(n)])
    ref_min = np.mean([sum(rollout(lambda o: rng.uniform(-2, 2, size=1), 2 * 10**6 + i)["rewards"]) for i in range(n)])
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env="Pendulum-v1", eval_env="Pendulum-v1", algorithm_name="noisy energy swing-up (ofql_data.py)",
        ref_min_score=float(ref_min), ref_max_score=float(ref_max), num_episodes_average_score=n,
        description="Built-in OFQL task: Pendulum-v1 with a noisy scripted swing-up controller.",
        author="ofql", author_email="none", code_permalink="ofql_data.py")


def d4rl_hdf5_to_minari(hdf5_path: str | Path, dataset_id: str, eval_env: str, ref_min: float, ref_max: float):
    """A D4RL v2 HDF5 file as a local Minari dataset: an episode per terminal/timeout boundary (terminals as
    terminations, timeouts and the unfinished tail as truncations). Without next_observations, the last step of a
    timeout or of the tail has no next observation and is dropped, as d4rl.qlearning_dataset does."""
    import h5py
    import minari
    from minari.data_collector import EpisodeBuffer

    with h5py.File(hdf5_path, "r") as f:
        obs, actions, rewards = f["observations"][:], f["actions"][:], f["rewards"][:]
        terminals, timeouts = f["terminals"][:].astype(bool), f["timeouts"][:].astype(bool)
        next_obs = f["next_observations"][:] if "next_observations" in f else None
    ends = np.flatnonzero(terminals | timeouts)
    if len(ends) == 0 or ends[-1] != len(rewards) - 1:
        ends = np.append(ends, len(rewards) - 1)
    buffers, start = [], 0
    for end in ends:  # this episode's transitions are start .. stop - 1
        # without next_observations: a terminal is never bootstrapped (mask 0), its own observation stands in for the
        # next one; a timeout's or the tail's next one is unknown (obs[end + 1] starts the next episode): step dropped
        stop = end + 1 if next_obs is not None or terminals[end] else end
        last_obs = obs[end] if next_obs is None else next_obs[end]
        if stop > start:  # a one-step timeout episode has nothing left
            truncations = np.zeros(stop - start, bool)
            truncations[-1] = not terminals[stop - 1]
            buffers.append(EpisodeBuffer(
                id=len(buffers), observations=np.concatenate([obs[start:stop], last_obs[None]]),
                actions=actions[start:stop], rewards=rewards[start:stop], terminations=terminals[start:stop],
                truncations=truncations))
        start = end + 1
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=eval_env, eval_env=eval_env, ref_min_score=ref_min, ref_max_score=ref_max,
        algorithm_name="D4RL v2 (converted by ofql_data.py)", author="D4RL", author_email="none",
        code_permalink="https://github.com/Farama-Foundation/D4RL",
        description=f"D4RL v2 data converted from {Path(hdf5_path).name}; refs are D4RL's constants.")


def check_d4rl_hdf5(path: Path):
    """A downloaded D4RL file is used only if it opens, has D4RL's arrays and they agree in length."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in D4RL_KEYS if k not in f]
            lengths = {len(f[k]) for k in D4RL_KEYS if k in f}
    except OSError as err:
        raise ValueError(f"not a readable HDF5 file ({str(err).splitlines()[0]}): truncated download?") from err
    if missing or len(lengths) != 1:
        raise ValueError(f"missing D4RL arrays {missing}" if missing else f"arrays of different lengths {sorted(lengths)}")


def load_d4rl_mujoco(name: str, mirror: str | None = None):
    """The exact D4RL v2 data of a MuJoCo task as a local Minari dataset `d4rl/<env>/<level>-v2` (downloaded once
    from `mirror` or D4RL's server into a .part file, kept only if it passes `check_d4rl_hdf5`, converted, cached
    under MINARI_DATASETS_PATH; eval env: gymnasium's -v4)."""
    import minari

    env, level = D4RL_MUJOCO[name]
    dataset_id = f"d4rl/{env}/{level}-v2"
    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id)
    root = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    base = (mirror or os.environ.get("OFQL_D4RL_MIRROR") or D4RL_BASE_URL).rstrip("/")
    url = f"{base}/{env}_{level.replace('-', '_')}-v2.hdf5"
    hdf5 = root / "d4rl_downloads" / Path(url).name
    if not hdf5.exists():
        hdf5.parent.mkdir(parents=True, exist_ok=True)
        part = hdf5.with_suffix(".part")
        print(f"downloading {url} -> {hdf5}")
        try:
            urllib.request.urlretrieve(url, part)
            check_d4rl_hdf5(part)
        except (OSError, ValueError) as err:
            part.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"D4RL dataset {name} is not in MINARI_DATASETS_PATH={root} and its download from {url} failed "
                f"({err}). Fix: another mirror with --d4rl-mirror URL or OFQL_D4RL_MIRROR=URL (the folder holding "
                f"{hdf5.name}); or on a connected machine download it and put it at {hdf5}, or run `python ofql.py "
                f"--env {name}` there and copy {root / 'd4rl'} here.") from err
        os.replace(part, hdf5)  # only a complete, checked file gets the final name
    print(f"converting {hdf5.name} into the Minari dataset {dataset_id}")
    return d4rl_hdf5_to_minari(hdf5, dataset_id, D4RL_EVAL_ENV[env], *D4RL_REF_SCORES[env])


def load_minari(source: str):
    """A Minari dataset by folder or id: local first, the built-in Pendulum one built on demand,
    otherwise downloaded with minari (one clear error when that is impossible)."""
    import minari

    path = Path(source)
    if path.is_dir():  # a dataset folder <root>/<namespace>/<name-vN> holding data/metadata.json
        data_dir = path if path.name == "data" else path / "data"
        if not (data_dir / "metadata.json").exists():
            raise FileNotFoundError(f"{path} is not a Minari dataset folder (no data/metadata.json in it)")
        return minari.MinariDataset(data_dir)
    if source in minari.list_local_datasets():
        return minari.load_dataset(source)
    if source == MINARI_SOURCE["pendulum-swingup"]:
        print(f"building the built-in dataset {source} (once, ~10 s)")
        return build_pendulum_dataset(source)
    where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    try:
        print(f"{source} is not in {where}: downloading it with minari")
        return minari.load_dataset(source, download=True)
    except Exception as err:  # no network, unknown id on the server, ...
        raise FileNotFoundError(
            f"Minari dataset '{source}' is not in MINARI_DATASETS_PATH={where} and could not be downloaded "
            f"({type(err).__name__}: {err}). Fix: on a connected machine run `minari download {source}` and copy "
            f"the folder into {where}, or pass --env PATH_TO_DATASET_FOLDER.") from err


def bandit_modes(n: int = 8, radius: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the 2-D bandit's modes on a circle and their rewards 0, 1/(n-1), ..., 1."""
    angles = 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1), np.arange(n) / (n - 1)


def bandit_reward(actions: np.ndarray) -> np.ndarray:
    """Reward of the nearest mode if within 3 std of it, else 0."""
    centres, rewards = bandit_modes()
    dist = np.linalg.norm(actions[:, None, :] - centres[None], axis=-1)
    return np.where(dist.min(1) < 3 * BANDIT_STD, rewards[dist.argmin(1)], 0.0)


def make_bandit_data(n: int = 20_000, seed: int = 0, background: float = 0.1) -> dict[str, np.ndarray]:
    """Offline one-step bandit: constant state; actions from 8 equally likely Gaussian modes, plus a
    `background` fraction drawn uniformly in [-1, 1]^2 (exploration that shows the critic that actions
    off the modes earn nothing). Reward: `bandit_reward`."""
    rng = np.random.default_rng(seed)
    centres, _ = bandit_modes()
    actions = centres[rng.integers(0, len(centres), n)] + BANDIT_STD * rng.normal(size=(n, 2))
    uniform = rng.random(n) < background
    actions[uniform] = rng.uniform(-1, 1, size=(int(uniform.sum()), 2))
    obs = np.zeros((n, 1))
    return {"obs": obs, "action": actions, "reward": bandit_reward(actions), "next_obs": obs, "mask": np.zeros(n)}



class BanditEnv(gym.Env):
    """bandit-8modes as an environment: one step from a zero observation, rewarded by `bandit_reward`."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(1), {}

    def step(self, action):
        return np.zeros(1), float(bandit_reward(np.asarray(action, np.float64)[None])[0]), True, False, {}


def plot_bandit(samples: np.ndarray, label: str, run_dir: Path):
    """bandit_samples.png in run_dir: the bandit's offline actions next to samples of the evaluation policy."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure to close

    fig = Figure(figsize=(8, 4))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, pts, title in zip(axes, (make_bandit_data(len(samples))["action"], samples), ("offline data", label)):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.savefig(Path(run_dir) / "bandit_samples.png", dpi=100, bbox_inches="tight")


def load_task(env_name: str, with_data: bool = True, d4rl_mirror: str | None = None
              ) -> tuple[dict, dict[str, np.ndarray] | None]:
    """(task fields, raw transitions with actions rescaled to [-1, 1]) for a task name of this file's families; the
    fields are ofql.Task's but its name (obs_dim, act_dim, make_env, ref_min, ref_max, ref_source, and the bandit's
    plot_samples). with_data=False skips reading the episodes (evaluation needs only the task:
    seconds instead of minutes)."""
    if env_name == "bandit-8modes":
        return {"obs_dim": 1, "act_dim": 2, "make_env": lambda **kwargs: BanditEnv(), "ref_min": 0.0, "ref_max": 1.0,
                "ref_source": "bandit: reward of the best mode", "plot_samples": plot_bandit}, (
            make_bandit_data() if with_data else None)
    source = MINARI_SOURCE.get(env_name, env_name)
    if env_name not in D4RL_MUJOCO and source == env_name and "/" not in env_name and not Path(env_name).exists():
        known = ["bandit-8modes", *D4RL_MUJOCO, *MINARI_SOURCE]
        close = difflib.get_close_matches(env_name, known, n=1)
        raise ValueError(f"unknown task '{env_name}'" + (f"; did you mean '{close[0]}'?" if close else "") + " Known tasks: "
                         f"{', '.join(sorted(known))}; or a Minari dataset id or folder, or ogbench/<dataset> "
                         "(docs/ogbench.md).")
    dataset = load_d4rl_mujoco(env_name, d4rl_mirror) if env_name in D4RL_MUJOCO else load_minari(source)
    dataset_id, space, obs_space = dataset.spec.dataset_id, dataset.action_space, dataset.observation_space
    family = next((c for prefix, c in CONVENTIONS.items() if f"/{prefix}/" in f"/{dataset_id}"), Convention())
    if family.obs_keys:  # AntMaze and Kitchen need gymnasium-robotics' environments registered
        import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
    if not isinstance(space, gym.spaces.Box) or not np.isfinite(space.low).all() or not np.isfinite(space.high).all():
        raise ValueError(f"dataset {dataset_id}: action space {space} is not a bounded Box; OFQL needs bounded "
                         "continuous actions")
    if not family.obs_keys and not isinstance(obs_space, gym.spaces.Box):
        raise ValueError(f"dataset {dataset_id}: observation space {obs_space} is not a Box")
    obs_dim = sum(obs_space[k].shape[0] for k in family.obs_keys) if family.obs_keys else obs_space.shape[0]
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    meta = dataset.storage.metadata
    if family.ref is not None:
        (ref_min, ref_max), ref_source = family.ref, family.ref_note
    elif "ref_min_score" in meta and "ref_max_score" in meta:
        ref_min, ref_max, ref_source = meta["ref_min_score"], meta["ref_max_score"], f"{dataset_id} metadata"
    else:
        ref_min, ref_max, ref_source = 0.0, 1.0, "none (score = 100 x raw return)"

    def make_env(**kwargs):
        env = dataset.recover_environment(eval_env=True, **dict(family.eval_kwargs), **kwargs)
        if family.obs_keys:
            box = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)
            env = gym.wrappers.TransformObservation(env, lambda o: flatten_obs(o, family.obs_keys), box)
        one = env.action_space.dtype.type(1)  # bounds in the space's dtype: float64 ones on float32 make gymnasium warn
        return gym.wrappers.RescaleAction(env, -one, one) if np.any(low != -1) or np.any(high != 1) else env

    task = {"obs_dim": obs_dim, "act_dim": space.shape[0], "make_env": make_env, "ref_min": ref_min,
            "ref_max": ref_max, "ref_source": ref_source}
    if not with_data:
        return task, None
    data = episodes_to_transitions(dataset.iterate_episodes(), family.obs_keys, dataset_id)
    if family.terminal_from_reward:
        data["mask"] = (data["reward"] <= 0).astype(np.float64)
    data["action"] = np.clip(2.0 * (data["action"] - low) / (high - low) - 1.0, -1.0, 1.0)
    return task, data


