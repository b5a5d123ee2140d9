"""OGBench single-task datasets for ofql.py's loop: `--env ogbench/<dataset>` (docs/ogbench.md).

    pip install -r requirements-ogbench.txt
    python ogbench_tasks.py --env ogbench/cube-single-play-singletask-task1-v0      # takes every ofql.py flag

Importing this file adds the `ogbench/` family to ofql.TASK_FAMILIES (its loader and preset). baselines.py imports
it, so baselines.py, eval.py and sweep.py train, sweep and evaluate OGBench runs as any other task. The paper's tasks
(D4RL) need only ofql.py; this file keeps the OGBench adaptation, read as FQL reads the data, out of it.
"""
from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

import ofql
from ofql import Preset, Task


def ogbench_preset(env: str) -> Preset:
    """`ogbench/<dataset>`: what carries over from FQL (docs/ogbench.md). Discount 0.995 where FQL used it (antmaze-
    giant, humanoidmaze-medium/large, antsoccer-arena), extended to the other giant and humanoid mazes and
    antsoccer-medium, else 0.99; one-sample evaluation (FQL's). eta: MuJoCo's, unmeasured on OGBench."""
    name = env.removeprefix("ogbench/")
    return Preset(gamma=0.995 if name.startswith(("humanoidmaze-", "antsoccer-")) or "maze-giant-" in name else 0.99,
                  eval_protocol="one")


def load_ogbench(name: str, with_data: bool = True) -> tuple[Task, dict[str, np.ndarray] | None]:
    """`ogbench/<dataset>` through ogbench.make_env_and_datasets, read as FQL reads it (docs/ogbench.md): its rewards
    and `masks` (its `terminals` only end trajectories, never crossed by a transition); score 100 x info['success']
    at episode end; files in OGBENCH_DATASET_DIR (default: ~/.ogbench/data), downloaded there when missing."""
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
    task = Task(name, env.observation_space.shape[0], env.action_space.shape[0], make_env, 0.0, 1.0,
                "OGBench: 100 x success rate (info['success'] at episode end, as FQL reports)", "success")
    env.close()
    if not with_data:
        return task, None
    folder = Path(os.environ.get("OGBENCH_DATASET_DIR", "~/.ogbench/data")).expanduser()
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


ofql.TASK_FAMILIES["ogbench/"] = (load_ogbench, ogbench_preset)

if __name__ == "__main__":
    ofql.main(tyro.cli(ofql.Args, description="OFQL on an OGBench dataset (--env ogbench/...): every ofql.py flag."))
