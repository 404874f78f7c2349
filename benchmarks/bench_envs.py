"""Agent steps per second of envs.py for cartpole and walker in every mode, random actions.

Each (task, mode) runs one warm-up episode, then `steps` timed agent steps, resets included (a video mode
decodes its next video at reset, a colour mode reloads the physics); the modes of a task take turns in
`rounds` slices so that background load affects them alike. Video modes should stay within 15% of train
mode on the same task.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
        python benchmarks/bench_envs.py --data-dir ../shared/dmcgb --fill-missing

--fill-missing is for data dirs with only part of DMC-GB's videos (like ../shared/dmcgb): it times on a
temporary data dir whose missing videos are symlinks to the available ones, reused cyclically. The speed
is what matters here, not which video plays; never use such a dir to evaluate an agent.
"""

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402


@dataclass
class Args:
    data_dir: str | None = None
    """DMC-GB data dir (default: envs.py's own lookup)"""
    fill_missing: bool = False
    """time on a temporary dir that reuses the available videos cyclically for the missing ones"""
    tasks: tuple[str, ...] = ("cartpole", "walker")
    modes: tuple[str, ...] = envs.MODES
    steps: int = 500
    """timed agent steps per (task, mode), after one warm-up episode"""
    rounds: int = 5
    """the timed steps are split into this many turns, modes alternating"""
    seed: int = 0


def filled_data_dir(source, target=None):
    """A data dir (target, else a temporary one) with every file each mode needs, symlinked to what source has
    (videos reused cyclically). Its reused videos do not have DMC-GB's git blob ids: envs.py is told not to check
    them (DMCGB_VERIFY=0, inherited by child processes). An agent evaluated there sees only source's videos."""
    os.environ["DMCGB_VERIFY"] = "0"
    target = Path(target) if target else Path(tempfile.mkdtemp(prefix="bench_envs_"))
    for mode in envs.MODES[1:]:
        names = envs.required_files(mode)
        available = sorted((source / mode).glob("video*.mp4")) if mode in envs.NUM_VIDEOS else [source / names[0]]
        if not available or not available[0].is_file():
            raise FileNotFoundError(f"{source} has no files for {mode}")
        for i, name in enumerate(names):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).symlink_to(available[i % len(available)].resolve())
    return target


class Runner:
    """Random actions in one env, resets included in the timing."""

    def __init__(self, env_id, mode, args, data_dir):
        self.env = envs.make_env(env_id, seed=args.seed, mode=mode, data_dir=data_dir)
        self.rng = np.random.default_rng(args.seed)
        self.done, self.seconds = True, 0.0
        self.run(self.env.max_episode_steps)  # warm-up episode: GL contexts, caches, first video
        self.seconds = 0.0

    def run(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            if self.done:
                self.env.reset()
            action = self.rng.uniform(-1, 1, self.env.action_shape).astype(np.float32)
            *_, terminated, truncated, _ = self.env.step(action)
            self.done = terminated or truncated
        self.seconds += time.perf_counter() - start


def main(args):
    data_dir = Path(args.data_dir) if args.data_dir else envs.resolve_data_dir()
    if args.fill_missing:
        data_dir = filled_data_dir(data_dir)
        print(f"NOTE: timing on {data_dir}, missing videos replaced by the available ones reused cyclically")
    print(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {os.cpu_count()} CPUs, {args.steps} timed steps per row")
    print(f"{'task':<10} {'mode':<11} {'steps/s':>8} {'vs train':>9}")
    slow = []
    try:
        for task in args.tasks:
            runners = {mode: Runner(task, mode, args, data_dir) for mode in args.modes}
            # modes take turns, so a change in background load hits them all alike
            per_turn = args.steps // args.rounds
            for _ in range(args.rounds):
                for runner in runners.values():
                    runner.run(per_turn)
            speed = {mode: per_turn * args.rounds / runner.seconds for mode, runner in runners.items()}
            for mode in args.modes:
                train = speed.get("train")
                ratio = f"{speed[mode] / train:9.2f}" if train else f"{'':9}"
                flag = ""
                if train and mode.startswith("video") and speed[mode] < 0.85 * train:
                    flag, slow = "  SLOW (>15% below train)", slow + [(task, mode)]
                print(f"{task:<10} {mode:<11} {speed[mode]:8.1f} {ratio}{flag}", flush=True)
            del runners
    finally:
        if args.fill_missing:
            shutil.rmtree(data_dir)  # symlinks only
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
