"""Does it learn, and does the saliency help on unseen scenes? SG-SAC against plain SAC on a 2-core CPU (not a test).

    python benchmarks/learning.py --seed 1 --output-dir runs/learning-seed1
    python benchmarks/learning.py --seed 3 --data-dir <DMC-GB data>       # offline, with all the files of its modes
    python benchmarks/learning.py --seed 1 --data-dir <partial copy> --reuse-videos   # a partial DMC-GB copy

Runs sgqn.py twice at once, one thread each: SG-SAC and plain SAC (--consistency-coef 0 --aux-update-freq 0),
same seed, same CPU-sized configuration (CONFIG: only size knobs differ from the paper's settings; about 4.3 and
1.8 hours on 2 cores, see README.md's results and docs/notebook.md). Both evaluate the deterministic policy at step
0 and every `eval_freq` steps on each mode of CONFIG. When a run is done, its final checkpoint is evaluated
(sgqn.py --eval-only, final-eval-episodes episodes) on every other DMC-GB mode whose data files are all there (or
can be downloaded), into evals/; when SAC is done (it is faster), the random policy is measured on all those modes
in its freed core. At the end report.py prints the table (the --eval-only results in their run's rows) and draws
the curves into the output dir.

Outputs in --output-dir (which must be new or empty): the two run folders (names with sgsac and sac), their
logs sgsac.log and sac.log, evals/ and the logs <algorithm>_final_modes.log, random_policy.json, learning.png. Ctrl-C stops both runs at their next safe
point with a checkpoint; the same command with --resume continues: the runs from their checkpoints, then the
evaluations, random policy and report still to do (python benchmarks/learning.py --seed 1 --resume).
Needs matplotlib for the picture: pip install -r benchmarks/requirements.txt (only the benchmarks use it).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench_envs  # noqa: E402
import envs  # noqa: E402

# The CPU-sized configuration; every flag not named here keeps sgqn.py's default (the paper's value).
# cartpole-balance at action repeat 8 (cartpole's repeat in the paper's appendix): 125 agent steps per episode.
# 16 filters instead of 32 halve an SG-SAC update at batch 64 on one thread (1.7 s instead of 3.6 s:
# python benchmarks/bench_update.py --batch-size 64 --threads 1 --env-steps 0 --num-filters 16, then 32), and
# batch 64 instead of 128 halves it again; 10,000 agent steps = 80 episodes = 80k simulator frames (paper: 500k steps).
CONFIG = {
    "env-id": "cartpole-balance",
    "action-repeat": 8,
    "num-filters": 16,
    "batch-size": 64,
    "total-timesteps": 10_000,
    "learning-starts": 250,
    "eval-freq": 1000,
    "eval-episodes": 5,
    "final-eval-episodes": 10,
    "eval-modes": ["train", "video_hard"],
}
PLAIN_SAC = ["--consistency-coef", "0", "--aux-update-freq", "0"]


@dataclass
class Bench:
    seed: int = 1
    """seed of both runs (and of the random policy)"""
    output_dir: str | None = None
    """new or empty folder for the runs, logs and picture (default: runs/learning-seed<seed>)"""
    data_dir: str | None = None
    """DMC-GB data (default: sgqn.py's lookup, which downloads what is missing)"""
    reuse_videos: bool = False
    """for a partial DMC-GB copy (like ../shared/dmcgb): the missing videos are the available ones, reused
    cyclically, so video modes test on those videos only"""
    sgqn_flags: str = ""
    """more sgqn.py flags for both runs, replacing CONFIG's of the same name (--sgqn-flags="--total-timesteps 8")"""
    resume: bool = False
    """continue the interrupted benchmark in --output-dir: its unfinished runs, then the steps still to do (the runs'
    own args.json give the configuration; the other flags are ignored)"""


def flags(config):
    return [arg for name, value in config.items() for arg in (f"--{name}", *map(str, value if isinstance(value, list) else [value]))]


def override(config, tokens):
    """CONFIG with the values of the flags in tokens that it names (the random policy must see them too), and the
    other tokens. ["--batch-size", "8", "--eval-modes", "train", "--cuda"] -> ({..., "batch-size": "8",
    "eval-modes": ["train"]}, ["--cuda"])."""
    config, extra, name = dict(config), [], None
    for token in tokens:
        if token.startswith("--"):
            name = token[2:] if token[2:] in config else None
            if name:
                config[name] = [] if isinstance(config[name], list) else None
        if name is None:
            extra.append(token)
        elif not token.startswith("--"):
            config[name] = [*config[name], token] if isinstance(config[name], list) else token
    return config, extra


def final_modes(config, data_dir):
    """The DMC-GB modes the runs do not evaluate periodically whose data files are all in data_dir, or all of them
    where sgqn.py may download (no --data-dir): each run's final checkpoint is evaluated on them at the end."""
    root, download = envs.resolve_data_dir(data_dir), data_dir is None and os.environ.get("DMCGB_DOWNLOAD") != "0"
    return [mode for mode in envs.MODES if mode not in config["eval-modes"]
            and (download or all((root / name).is_file() for name in envs.required_files(mode)))]


def random_policy(config, modes, seed, data_dir, episodes):
    """Returns of uniformly random actions in each mode's env, seeded as sgqn.py seeds its test envs.
    A random policy does not look, so every mode gives the same returns: the physics' level."""
    returns = {}
    for mode in modes:
        env = envs.make_env(config["env-id"], seed + 42, mode, int(config["action-repeat"]), data_dir=data_dir)
        rng = np.random.default_rng(seed)
        returns[mode] = []
        for _ in range(episodes):
            env.reset()
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(rng.uniform(env.action_low, env.action_high).astype(np.float32))
                total, done = total + reward, terminated or truncated
            returns[mode].append(total)
    return returns


def run_dirs(out):
    return sorted(str(p) for p in out.iterdir() if p.is_dir() and "__" in p.name)


def finished_evals(out):
    """The --eval-only folders in out/evals that wrote their results (an interrupted one did not)."""
    return [d for d in run_dirs(out / "evals") if (Path(d) / "results.json").is_file()] if (out / "evals").is_dir() else []


def report_command(out):
    random = ["--random", str(out / "random_policy.json")] if (out / "random_policy.json").exists() else []
    evals = finished_evals(out)
    return [sys.executable, str(ROOT / "benchmarks" / "report.py"), *run_dirs(out), *evals, *random, "--plot",
            str(out / "learning.png")]


def main(bench):
    out = Path(bench.output_dir or f"runs/learning-seed{bench.seed}").resolve()
    if bench.resume:
        return resume(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"error: --output-dir {out} is not empty; give a new folder (a benchmark never overwrites another), "
                 "or add --resume to continue the benchmark in it")
    config, extra = override(CONFIG, shlex.split(bench.sgqn_flags))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = bench.data_dir
    if bench.reuse_videos:
        source = envs.resolve_data_dir(bench.data_dir)
        try:
            data_dir = str(bench_envs.filled_data_dir(source, out / "dmcgb"))
        except FileNotFoundError as e:
            shutil.rmtree(out / "dmcgb", ignore_errors=True)
            sys.exit(f"error: --reuse-videos: {e}; give --data-dir a DMC-GB copy with the colour tables and a video per mode")
        print(f"NOTE: video modes use only the videos in {source}, reused cyclically ({data_dir})")
    common = [*flags(config), "--seed", str(bench.seed), "--output-dir", str(out), *(["--data-dir", data_dir] if data_dir else []), *extra]
    print(f"SG-SAC and SAC, seed {bench.seed}, one thread each: sgqn.py {' '.join(common)}")
    finish(out, config, data_dir, bench.seed, {"sgsac": common, "sac": [*common, *PLAIN_SAC]})


def resume(out):
    """Continue an interrupted benchmark in out, in the configuration its runs were started with."""
    found = {Path(d).name.split("__")[1]: Path(d) for d in run_dirs(out)} if out.is_dir() else {}
    if set(found) != {"sgsac", "sac"} or len(run_dirs(out)) != 2:
        sys.exit(f"error: --resume: {out} does not hold one sgsac and one sac run of learning.py; give its --output-dir "
                 "(or --seed)")
    args = json.loads((found["sgsac"] / "args.json").read_text())
    config = {name: args[name.replace("-", "_")] for name in CONFIG}
    if (out / "dmcgb").is_dir():  # --reuse-videos: its reused videos are not DMC-GB's files
        os.environ["DMCGB_VERIFY"] = "0"
    print(f"resuming the benchmark in {out}")
    runs = {label: ["--resume", str(run_dir)] for label, run_dir in found.items() if not (run_dir / "results.json").is_file()}
    finish(out, config, args["data_dir"], args["seed"], runs)


def finish(out, config, data_dir, seed, to_run):
    """Run sgqn.py with each label's flags in to_run (side by side), evaluate each finished run's final checkpoint on
    the other modes, measure the random policy (each step not yet done in out), then print the report."""
    # one thread each (two multi-threaded runs on 2 cores thrash); glibc's allocator otherwise returns and
    # re-requests the big activations every update, which adds seconds of noise
    child_env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000", **os.environ,
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    other_modes = final_modes(config, data_dir)
    print(f"then each final checkpoint on {' '.join(other_modes) or 'no other mode (their data is incomplete)'}")

    def evaluate_final(label):  # the run's final checkpoint on the other modes, in this process's time
        (run_dir,) = [d for d in run_dirs(out) if Path(d).name.split("__")[1] == label]
        if not other_modes or any(Path(json.loads((Path(d) / "results.json").read_text())["checkpoint"]).parent.name
                                  == Path(run_dir).name for d in finished_evals(out)):
            return 0
        command = [sys.executable, str(ROOT / "sgqn.py"), "--checkpoint", str(Path(run_dir) / "checkpoint.pt"),
                   "--eval-only", "--eval-modes", *other_modes, "--final-eval-episodes", str(config["final-eval-episodes"]),
                   "--output-dir", str(out / "evals"), *(["--data-dir", data_dir] if data_dir else [])]
        with open(out / f"{label}_final_modes.log", "a") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env).returncode

    start, runs = time.time(), {}
    for label, sgqn_flags in to_run.items():
        log = open(out / f"{label}.log", "a")
        runs[label] = subprocess.Popen([sys.executable, str(ROOT / "sgqn.py"), *sgqn_flags], stdout=log, stderr=subprocess.STDOUT, env=child_env)

    def pass_on(signum, frame):  # a scheduler's SIGTERM reaches only this process (a Ctrl-C reaches the runs too)
        for run in runs.values():
            run.send_signal(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, pass_on)
    try:
        status = {"sac": runs["sac"].wait() if "sac" in runs else 0}
        print(f"SAC done in {(time.time() - start) / 60:.0f} min (exit status {status['sac']}); its final checkpoint on "
              "the other modes, then the random policy")
        status["sac final modes"] = evaluate_final("sac") if status["sac"] == 0 else 0
        episodes = int(config["final-eval-episodes"])
        if not (out / "random_policy.json").is_file():
            returns = random_policy(config, [*config["eval-modes"], *other_modes], seed, data_dir, episodes)
            (out / "random_policy.json").write_text(json.dumps(dict(env_id=config["env-id"], action_repeat=int(config["action-repeat"]),
                                                                    seed=seed, returns=returns), indent=1))
        status["sgsac"] = runs["sgsac"].wait() if "sgsac" in runs else 0
        print(f"SG-SAC done in {(time.time() - start) / 60:.0f} min (exit status {status['sgsac']})")
        status["sgsac final modes"] = evaluate_final("sgsac") if status["sgsac"] == 0 else 0
    except KeyboardInterrupt:  # the runs checkpoint and stop
        for run in runs.values():
            run.wait()
        sys.exit(f"interrupted: continue with python benchmarks/learning.py --resume --output-dir {out}")
    if any(status.values()):
        failed = [name for name, code in status.items() if code]
        sys.exit(f"error: {', '.join(failed)} failed, see the end of the logs in {out}")
    sys.exit(subprocess.run(report_command(out)).returncode)


if __name__ == "__main__":
    main(tyro.cli(Bench))
