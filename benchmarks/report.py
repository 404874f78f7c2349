"""The paper's Table 1 from run folders, and their learning curves (not a test).

    python benchmarks/report.py runs/*                                 # every run folder under runs/
    python benchmarks/report.py runs/sweep/* --plot curves.png         # and the curves of each group
    python benchmarks/report.py runs/learning-seed*/*__s* --random runs/learning-seed1/random_policy.json

Reads each run folder's args.json, metrics.jsonl and results.json, groups the runs by task (env id and action
repeat) and algorithm (sgsac, sac, sac-consistency, sac-selfsup, from the run's switches), and prints one
table per evaluation mode in the layout of the paper's Table 1: a row per task, a column per algorithm, the
final return as mean +- std over seeds (n = seeds). With a single seed the +- is the std over that run's
final evaluation episodes, marked "ep". A run without results.json, or extended past it
(--resume --total-timesteps, still going), counts in the curves only. Where SG-SAC and SAC both have two finished
seeds or more on a task, each table adds the exact one-sided permutation test of "SG-SAC's final return is above
SAC's" over the seeds: its p-value, a share of relabellings, not a verdict.
--plot draws, per task and mode, the evaluation return against agent steps (simulator frames on the top
axis): the mean over the group's seeds and the range from the lowest to the highest seed, and the random
policy's mean as a dashed line when --random gives learning.py's random_policy.json. Needs matplotlib.
"""

import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ALGORITHMS = ("sgsac", "sac", "sac-consistency", "sac-selfsup")  # the column order
LABELS = {"sgsac": "SG-SAC", "sac": "SAC", "sac-consistency": "SAC + consistency", "sac-selfsup": "SAC + self-supervised"}


@dataclass
class Report:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run folders of sgqn.py (each with args.json and metrics.jsonl)"""
    plot: str | None = None
    """draw the curves into this PNG"""
    random: str | None = None
    """random_policy.json of benchmarks/learning.py: the random policy's level in the table and the curves"""


def read_run(run_dir):
    """-> (task (env id, action repeat), algorithm, seed, curves {mode: [(step, return)]},
    final {mode: (mean, std, episodes)} or None)."""
    run_dir = Path(run_dir)
    if not (run_dir / "args.json").is_file() or not (run_dir / "metrics.jsonl").is_file():
        sys.exit(f"error: {run_dir} is not a run folder of sgqn.py (no args.json or metrics.jsonl); give run folders")
    args = json.loads((run_dir / "args.json").read_text())
    curves = defaultdict(list)
    for line in open(run_dir / "metrics.jsonl"):
        row = json.loads(line)
        if "eval_return" in row:
            curves[row["mode"]].append((row["step"], row["eval_return"]))
    final = None
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else None
    if results and results["step"] >= args["total_timesteps"]:  # (a run extended with --resume is unfinished again)
        final = {mode: (r["mean"], r["std"], r["episodes"]) for mode, r in results["results"].items()}
    algorithm = (run_dir.name.split("__") + [""])[1]  # sgqn.py names its run folders <env>__<algorithm>__...
    if algorithm not in ALGORITHMS:
        sys.exit(f"error: {run_dir} is not named as sgqn.py names run folders (<env>__<algorithm>__...); keep its name")
    return (args["env_id"], args["action_repeat"]), algorithm, args["seed"], dict(curves), final


def task_name(task):
    return f"{task[0]} (action repeat {task[1]})"


def group_runs(run_dirs):
    """{(task, algorithm): [run, ...]} in the order tasks first appear; one seed twice is an error. The results of an
    --eval-only folder (sgqn.py --checkpoint <run>/checkpoint.pt --eval-only) join its run's final results, for the
    modes that run did not evaluate itself, when a run folder of that name is given and finished."""
    groups, evaluations = defaultdict(list), []
    for run_dir in run_dirs:
        results = Path(run_dir) / "results.json"
        if not (Path(run_dir) / "args.json").exists() and results.is_file() and json.loads(results.read_text()).get("checkpoint"):
            evaluations.append((run_dir, json.loads(results.read_text())))
            continue
        task, algo, seed, curves, final = read_run(run_dir)
        if any(run["seed"] == seed for run in groups[task, algo]):
            sys.exit(f"error: two {algo} runs of {task_name(task)} with seed {seed} (one is {run_dir}); give each seed once")
        groups[task, algo].append(dict(dir=run_dir, seed=seed, curves=curves, final=final))
    runs = {Path(run["dir"]).name: run for group in groups.values() for run in group}  # names are unique (a timestamp)
    for eval_dir, results in evaluations:
        run = runs.get(Path(results["checkpoint"]).parent.name)  # by name: run folders may move (copies, archives)
        if run is None or run["final"] is None or results["step"] != max((s for c in run["curves"].values() for s, _ in c), default=None):
            print(f"skipped {eval_dir}: an --eval-only evaluation of {results['checkpoint']}, not of a finished run given here")
            continue
        added = {mode: (r["mean"], r["std"], r["episodes"]) for mode, r in results["results"].items() if mode not in run["final"]}
        run["final"].update(added)
        print(f"{eval_dir}: {' '.join(added) or 'no new mode'} added to {run['dir']}")
    return groups


def cell(runs, mode):
    """'mean +- std (n)' of the final returns over the finished runs' seeds; with one seed, its episodes' std."""
    finals = [run["final"][mode] for run in runs if run["final"] and mode in run["final"]]
    if not finals:
        return "-"
    if len(finals) == 1:
        mean, std, episodes = finals[0]
        return f"{mean:.0f} ± {std:.0f} ep (1)"
    means = np.array([mean for mean, _, _ in finals])
    return f"{means.mean():.0f} ± {means.std():.0f} ({len(finals)})"


def random_returns(random, task, mode):
    """The random policy's returns on mode if random_policy.json was measured on this task, else []."""
    if not random or task != (random["env_id"], random["action_repeat"]):
        return []
    return random["returns"].get(mode, [])


def permutation_p(a, b):
    """Exact one-sided permutation test of "a's mean is above b's": the share of the ways to split the pooled values
    into groups of len(a) and len(b) whose difference of means is at least the observed one (1 / C(n, len(a)) at
    best: 1/6 for 2 seeds each, 1/20 for 3)."""
    pooled, observed = np.array([*a, *b], float), np.mean(a) - np.mean(b)
    splits = [np.isin(np.arange(len(pooled)), chosen) for chosen in itertools.combinations(range(len(pooled)), len(a))]
    diffs = np.array([pooled[s].mean() - pooled[~s].mean() for s in splits])
    return float(np.mean(diffs >= observed - 1e-9))


def tables(groups, random):
    """One table per mode: rows tasks, columns algorithms (and the random policy)."""
    tasks = list(dict.fromkeys(task for task, _ in groups))
    algos = [a for a in ALGORITHMS if any(a == algo for _, algo in groups)]
    modes = list(dict.fromkeys(mode for runs in groups.values() for run in runs for mode in (run["final"] or run["curves"])))
    lines = []
    for mode in modes:
        header = ["task", *(LABELS[a] for a in algos), *(["random policy"] if random else [])]
        lines += [f"\n{mode}: final return, mean ± std over seeds (n seeds; ep: one seed, std over its episodes)",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for task in tasks:
            row = [task_name(task), *(cell(groups.get((task, a), []), mode) for a in algos)]
            if random:
                returns = random_returns(random, task, mode)
                row.append(f"{np.mean(returns):.0f} ± {np.std(returns):.0f} ep ({len(returns)})" if returns else "-")
            lines.append("| " + " | ".join(row) + " |")
        for task in tasks:  # SG-SAC against SAC over seeds, where each has two finished seeds or more
            finals = {a: [run["final"][mode][0] for run in groups.get((task, a), []) if run["final"] and mode in run["final"]]
                      for a in ("sgsac", "sac")}
            if min(map(len, finals.values())) >= 2:
                p = permutation_p(finals["sgsac"], finals["sac"])
                lines.append(f"{task_name(task)}: SG-SAC's mean above SAC's by chance alone in a share p = {p:.3f} of the "
                             f"relabellings of its {len(finals['sgsac'])} + {len(finals['sac'])} seeds (exact permutation test)")
    unfinished = [run["dir"] for runs in groups.values() for run in runs if not run["final"]]
    if unfinished:
        lines.append(f"\nunfinished (curves only): {', '.join(map(str, unfinished))}")
    return "\n".join(lines)


def plot(groups, random, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for task, _ in groups))
    modes = list(dict.fromkeys(mode for runs in groups.values() for run in runs for mode in run["curves"]))
    fig, axes = plt.subplots(len(tasks), len(modes), figsize=(4.2 * len(modes), 3.6 * len(tasks)), squeeze=False)
    for task, row in zip(tasks, axes):
        for mode, ax in zip(modes, row):
            for algo in ALGORITHMS:
                runs = groups.get((task, algo), [])
                curves = [dict(run["curves"].get(mode, [])) for run in runs]
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []  # evaluated by every seed
                if not steps:
                    continue
                returns = np.array([[c[s] for s in steps] for c in curves])  # (seeds, steps)
                (line,) = ax.plot(steps, returns.mean(0), marker=".", label=f"{LABELS[algo]} (n={len(runs)})")
                if len(runs) > 1:
                    ax.fill_between(steps, returns.min(0), returns.max(0), color=line.get_color(), alpha=0.2)
            if random_returns(random, task, mode):
                ax.axhline(np.mean(random_returns(random, task, mode)), color="gray", linestyle="--", label="random policy")
            ax.set(title=f"{task[0]}, {mode}", xlabel="agent steps", ylabel="evaluation return", ylim=(0, 1000))
            ax.title.set_fontsize(10)
            ax.secondary_xaxis("top", functions=(lambda x, r=task[1]: x * r, lambda x, r=task[1]: x / r)).set_xlabel(
                "simulator frames")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"curves written to {path}")
    return fig


def main(report):
    if not report.run_dirs:
        sys.exit("error: give run folders, e.g. python benchmarks/report.py runs/*")
    groups = group_runs(report.run_dirs)
    if report.random and not Path(report.random).is_file():
        sys.exit(f"error: --random {report.random} does not exist; give learning.py's random_policy.json or leave it out")
    random = json.loads(Path(report.random).read_text()) if report.random else None
    print(tables(groups, random))
    if report.plot:
        plot(groups, random, report.plot)


if __name__ == "__main__":
    main(tyro.cli(Report))
