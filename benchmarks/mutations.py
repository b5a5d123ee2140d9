"""Mutation check of the test suite: apply each plausible bug to a scratch copy of ofql.py and report the
first test that fails (a test suite that passes on a broken algorithm proves nothing).

    python benchmarks/mutations.py [--json out.json] [name ...]     # ~5 minutes on one core

Each mutation is run against the fast tests first, then the slower learning tests, stopping at the first
failure (pytest -x), so the table names one catching test per mutation, not all of them.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTATIONS = {
    "TD target max over heads": ("q_next.min(0).values", "q_next.max(0).values"),
    "Polyak with 1 - tau": ("list(self.critic.parameters()), self.args.tau)", "list(self.critic.parameters()), 1 - self.args.tau)"),
    "critic optimiser never stepped": ("self.optimise(critic_loss, self.critic, self.critic_opt)", "critic_loss.backward()"),
    "eta normaliser not detached": ("q_norm.abs().mean().detach()", "q_norm.abs().mean()"),
    "r and t swapped in the BC call": ("actor.velocity_and_dudt(z, r, t, obs, v)", "actor.velocity_and_dudt(z, t, r, obs, v)"),
    "JVP tangent on r instead of t": (
        """        emb_t, demb_t = self.emb_t.forward_with_tangent(t)
        emb_r = self.emb_r(r)
        x = torch.cat([z, emb_r, emb_t, obs], -1)
        with torch.no_grad():
            tangent = torch.cat([v, torch.zeros_like(emb_r), demb_t, torch.zeros_like(obs)], -1)""",
        """        emb_r, demb_r = self.emb_r.forward_with_tangent(r)
        emb_t = self.emb_t(t)
        x = torch.cat([z, emb_r, emb_t, obs], -1)
        with torch.no_grad():
            tangent = torch.cat([v, demb_r, torch.zeros_like(emb_t), torch.zeros_like(obs)], -1)"""),
    "target v instead of the MeanFlow target": ("target = v - (t - r)[:, None] * dudt", "target = v"),
    "BC loss sign flipped": ("    return err.mean()\n", "    return -err.mean()\n"),
    "evaluation on raw observations of a normalised agent": (
        "obs_t = torch.as_tensor(normalizer(obs[idx]),", "obs_t = torch.as_tensor(obs[idx],"),
    "observation statistics fitted on env resets": (
        'Normalizer.fit(data["obs"], args.normalize_obs)',
        'Normalizer.fit(np.stack([task.make_env().reset(seed=i)[0] for i in range(100)]), args.normalize_obs)'),
    "obs normalised but not next_obs": (
        'data["obs"], data["next_obs"] = normalizer(data["obs"]), normalizer(data["next_obs"])',
        'data["obs"] = normalizer(data["obs"])'),
}
FAST = ("dudt or bc_loss_is_zero or td_target_is or polyak or normalises_q or chain or normalised_observations or "
        "dataset_statistics")
SLOW = "covers_every_mode or beats_one_step_flow or q_guidance"
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
parser.add_argument("--json", help="write {mutation: failing tests} here")
cli = parser.parse_args()
results = {}
for name, (old, new) in MUTATIONS.items():
    if cli.names and name not in cli.names:
        continue
    with tempfile.TemporaryDirectory() as tmp:
        for f in [*(p.name for p in REPO.glob("*.py")), "pytest.ini"]:  # every file the tests import
            shutil.copy(REPO / f, tmp)
        src = (Path(tmp) / "ofql.py").read_text()
        assert src.count(old) == 1, name
        (Path(tmp) / "ofql.py").write_text(src.replace(old, new))
        failed, t0 = [], time.time()
        for subset in (FAST, SLOW):
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_ofql.py", "-k", subset],
                                 cwd=tmp, capture_output=True, text=True)
            if run.returncode not in (0, 1):  # 2-5: collection or usage error, not a verdict on the mutation
                sys.exit(f"{name}: pytest could not run the tests (exit {run.returncode}):\n{run.stdout[-2000:]}")
            out = run.stdout
            failed = [l.split("::")[1].split(" ")[0] for l in out.splitlines() if l.startswith("FAILED")]
            if failed:
                break
        results[name] = failed
        print(f"{name}: {'FAILS ' + ', '.join(failed) if failed else 'NOT CAUGHT'} ({time.time() - t0:.0f} s)", flush=True)
print("\n| mutation | first failing test |\n|---|---|")
for name, failed in results.items():
    print(f"| {name} | {', '.join(failed) or '**none: not caught**'} |")
if cli.json:
    Path(cli.json).write_text(json.dumps(results, indent=2))
sys.exit(1 if not all(results.values()) else 0)
