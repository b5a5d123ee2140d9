"""Every number in the README's results table must come from a committed JSON under benchmarks/results/ of its row
(ROWS: rounded as the README writes it, x 100 for a percentage, or the ratio of two numbers of one file for an `Nx`),
or, for CORL's TD3+BC and IQL, from ../shared/datasets/README.md (not in this repository). Rows whose cell says
"no committed JSON" are reported and skipped: their numbers are labelled in the README as not traceable.

    python benchmarks/check_readme_numbers.py        # exits 1 if a number is found in none of its row's files
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CORL = REPO.parent / "shared" / "datasets" / "README.md"
CAL = "benchmarks/results/calibration/"
ROWS = {  # the start of a row's first cell -> globs of the files its numbers come from
    "hopper stand-in medium-expert": [CAL + "me-layernorm-argmax50-50k-2seeds/*.json",
                                      CAL + "me-layernorm-argmax50-50k-*/*.json",
                                      CAL + "me-gamma0.995-tau0.02-eta0.1-deterministic-50k-3seeds/*.json"],
    "hopper stand-in medium,": [CAL + "med-layernorm-argmax50-50k-3seeds/**/*.json",
                                CAL + "medium-regression-bc-50k-3seeds/*.json",
                                CAL + "med-gamma0.995-tau0.02-eta0.1-deterministic-50k-3seeds/*.json", "CORL"],
    "hopper stand-in medium-replay": [CAL + "mr-gamma0.995-tau0.02-eta0.1-deterministic-50k-3seeds/*.json",
                                      CAL + "protocols-rescored-gamma0.995-tau0.02-50k/**/*.json"],
    "OGBench cube-single-play": ["benchmarks/results/ogbench/runs/*.json", "benchmarks/results/ogbench/vs_fql.json",
                                 "benchmarks/results/ogbench/rescored/*__protocols.json"],
    "OGBench cube-double-play": ["benchmarks/results/ogbench/runs/*.json", "benchmarks/results/ogbench/vs_fql.json"],
    "OGBench puzzle-3x3-play": ["benchmarks/results/ogbench/runs/*.json", "benchmarks/results/ogbench/vs_fql.json"],
    "toy, paper Figure 3": ["benchmarks/results/toy_figure.json"],
    "training steps/s": ["benchmarks/results/train_speed_cpu_1thread.json"],
    "time per gradient step": ["benchmarks/results/train_policies_cpu_1thread.json"],
    "decisions/s at batch 1": ["benchmarks/results/decision_frequency_cpu_1thread.json"],
}
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:%|x)?")
SETTING = re.compile(r"(?:FM|OFQL|DQL)-\d+|\d+ seeds?|\d+k\b|at \d+k|eta [\d.]+|gamma [\d.]+|tau [\d.]+|of \d+|> \d+|"
                     r">= [\d.]+|batch \d+")  # settings, not results


def numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for item in value.values() for x in numbers(item)]
    if isinstance(value, list):
        return [x for item in value for x in numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def found_in(text: str, files: list[list[float]]) -> bool:
    value = float(text.rstrip("%x").replace(",", ""))
    decimals = len(text.rstrip("%x").split(".")[1]) if "." in text else 0
    close = lambda x: abs(x - value) <= 0.5 * 10 ** -decimals + 1e-9  # noqa: E731  (rounded as written)
    for values in files:
        if any(close(v) or (text.endswith("%") and close(100 * v)) for v in values):
            return True
        if text.endswith("x") and any(close(a / b) for a in values for b in values if b):
            return True
    return False


def main() -> int:
    section = (REPO / "README.md").read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in section.splitlines()
            if row.startswith("| ") and not row.startswith(("| what", "|---"))]
    corl = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.\d+", CORL.read_text())] if CORL.exists() else []
    missing = []
    for what, _, result, *_ in rows:
        globs = next((g for prefix, g in ROWS.items() if what.startswith(prefix)), None)
        if globs is None or "no committed JSON" in result:
            print(f"-- {what[:60]}: {'labelled: no committed JSON' if 'no committed JSON' in result else 'NO SOURCE'}")
            if "no committed JSON" not in result:
                missing.append(what)
            continue
        files = [numbers(json.loads(p.read_text())) for g in globs if g != "CORL" for p in sorted(REPO.glob(g))]
        for g in globs:  # mean and std (numpy's, ddof 0) over the seeds of a folder of run summaries
            finals = [json.loads(p.read_text()) for p in sorted(REPO.glob(g)) if p.name.endswith("summary.json")]
            finals = [f["final_score"] for f in finals if isinstance(f, dict) and f.get("final_score") is not None]
            files += [[float(np.mean(finals)), float(np.std(finals))]] if len(finals) > 1 else []
        files += [corl] if "CORL" in globs else []
        for text in NUMBER.findall(SETTING.sub(" ", result.replace("+-", " "))):
            ok = found_in(text, files)
            print(f"   {what[:40]:40} {text:>10} {'ok' if ok else 'NOT FOUND'}")
            missing += [] if ok else [f"{what[:30]}: {text}"]
    print(f"{len(missing)} number(s) found in none of their row's files: {missing}" if missing else "every number found")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
