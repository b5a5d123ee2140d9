"""Re-score checkpoints under a grid of evaluation settings (actor, noise scale, selection), one table and JSON.

    python benchmarks/rescore.py RUN/checkpoint_50000.pt [...] --eval-ema True False --noise 1.0 0.5 \
        --protocol paper one --episodes 10 --seeds 0 1 --json out.json

Each cell is `eval.py --checkpoint C --eval-ema E --eval-noise-scale S --eval-protocol P` (same seeds, so the
cells of one checkpoint see the same environment resets). Training is untouched: this only changes how a
trained policy acts, which is how docs/calibration.md compares the protocols.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval as ofql_eval  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eval-ema", nargs="+", default=["False"], choices=["True", "False"])
    parser.add_argument("--noise", nargs="+", type=float, default=[None], help="--eval-noise-scale values (default: the protocol's)")
    parser.add_argument("--protocol", nargs="+", default=["paper"], choices=["paper", "one", "deterministic"])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--json", help="write the rows here")
    cli = parser.parse_args(argv)
    rows = []
    for checkpoint, ema, noise, protocol in itertools.product(cli.checkpoints, cli.eval_ema, cli.noise, cli.protocol):
        cfg = ofql_eval.EvalArgs(checkpoint=checkpoint, episodes=cli.episodes, seeds=cli.seeds, eval_protocol=protocol,
                                 eval_noise_scale=noise, eval_ema=ema == "True")
        result = ofql_eval.evaluate_checkpoint(cfg)
        rows.append({"checkpoint": checkpoint, "eval_ema": ema == "True", "eval_noise_scale": result["eval_noise_scale"],
                     "eval_protocol": protocol, "score_mean": result["score_mean"],
                     "score_std_episodes": result["score_std_episodes"], "episodes": cli.episodes * len(cli.seeds)})
        if cli.json:  # written after every cell: a long grid that is stopped keeps what it measured
            Path(cli.json).write_text(json.dumps(rows, indent=2))
    print(f"\n| checkpoint | EMA actor | noise scale | protocol | score (+- std over {rows[0]['episodes']} episodes) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['checkpoint']} | {row['eval_ema']} | {row['eval_noise_scale']} | {row['eval_protocol']} | "
              f"{row['score_mean']:.1f} +- {row['score_std_episodes']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
