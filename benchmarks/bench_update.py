"""Speed of SG-SAC against plain SAC on the current device (not a test).

    python benchmarks/bench_update.py                        # batch 128: updates, operations, env, end to end
    python benchmarks/bench_update.py --batch-size 32 --threads 1 --env-steps 0   # the CPU learning-run regime
    python benchmarks/bench_update.py --data-dir ../shared/dmcgb --fill-missing    # with a partial DMC-GB copy

Update time: one gradient step with the real network sizes, after warm-up; the median over `pairs` of
(odd step + even step) / 2, so the every-2-steps parts (actor, temperature, target, aux) are amortised. Plain
SAC is the same script with both saliency mechanisms off (--consistency-coef 0 --aux-update-freq 0).
Operations: those dispatched to kernels per update (views excluded), what a GPU pays a launch for.
End to end: sgqn.main on cartpole at action repeat 8, `e2e_batch_size` seed steps then one update per step for
as many steps, with one evaluation episode on train and video_hard halfway: training agent steps per second and
the share of the run's time spent evaluating.
"""

import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench_envs  # noqa: E402
import envs  # noqa: E402
import sgqn  # noqa: E402


@dataclass
class Bench:
    pairs: int = 11
    """timed (odd, even) step pairs per variant, after one warm-up pair"""
    batch_size: int = 128
    """batch size of the update"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    num_filters: int = 32
    """filters per conv layer of both variants (16: the CPU learning benchmark's)"""
    env_steps: int = 200
    """agent steps per environment mode, and run the end-to-end part (0: updates and operations only)"""
    e2e_batch_size: int = 32
    """batch size, seed steps and training steps of the end-to-end runs"""
    data_dir: str | None = None
    """DMC-GB data for the video_hard speed (default: envs.py's lookup)"""
    fill_missing: bool = False
    """time video_hard on the available videos reused cyclically (for a partial data dir like ../shared/dmcgb)"""
    cuda: bool = True
    """use CUDA when available"""


def time_updates(variants, device, batch_size, pairs):
    """Seconds per step, one value per timed pair, of each variant {label: (step function, Args switches)}.
    The variants take turns, pair by pair, so that a change in background load hits them alike; batches are
    laid out as the training loop makes them (random_shift of uint8, then float)."""
    overlay = envs.procedural_images(256, 84, torch.Generator().manual_seed(0)).to(device)
    frames = torch.randint(0, 256, (2, batch_size, 9, 84, 84), dtype=torch.uint8, device=device)
    agents = {}
    for label, (_, switches) in variants.items():
        torch.manual_seed(0)
        args = sgqn.Args(**switches)
        agents[label] = (sgqn.make_agent((9, 84, 84), 6, args, device), args)
    times = {label: [] for label in variants}
    for pair in range(pairs + 1):  # the first pair warms up
        for label, (step_fn, _) in variants.items():
            agent, args = agents[label]
            batch = (
                sgqn.random_shift(frames[0], args.shift_pad).float(),
                torch.rand(batch_size, 6, device=device) * 2 - 1,
                torch.rand(batch_size, 1, device=device),
                sgqn.random_shift(frames[1], args.shift_pad).float(),
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for step in (2 * pair + 1, 2 * pair + 2):
                losses = step_fn(agent, batch, step, args, overlay)
            losses["td"].item()  # wait for the device
            if pair > 0:
                times[label].append((time.perf_counter() - start) / 2)
    return {label: np.array(t) for label, t in times.items()}


def env_speed(modes, steps, data_dir):
    """Agent steps per second on cartpole, random actions, resets included (bench_envs.py does every task and mode)."""
    bench_args = bench_envs.Args(steps=steps)
    runners = {mode: bench_envs.Runner("cartpole", mode, bench_args, data_dir) for mode in modes}
    for _ in range(bench_args.rounds):  # modes take turns, so background load hits them alike
        for runner in runners.values():
            runner.run(steps // bench_args.rounds)
    return {mode: steps // bench_args.rounds * bench_args.rounds / runner.seconds for mode, runner in runners.items()}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_operations(switches, device):
    """Operations per update (an odd and an even step, halved), after the optimisers' first step."""
    torch.manual_seed(0)
    args = sgqn.Args(**switches)
    agent = sgqn.make_agent((9, 84, 84), 6, args, device)
    overlay = envs.procedural_images(4, 84, torch.Generator().manual_seed(0)).to(device)
    batch = (torch.rand(4, 9, 84, 84, device=device) * 255, torch.rand(4, 6, device=device), torch.rand(4, 1, device=device),
             torch.rand(4, 9, 84, 84, device=device) * 255)
    for step in (1, 2):
        sgqn.update(agent, batch, step, args, overlay)
    with CountOps() as ops:
        for step in (3, 4):
            sgqn.update(agent, batch, step, args, overlay)
    return ops.count / 2


def main(bench):
    if bench.threads:
        torch.set_num_threads(bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")

    filters = dict(num_filters=bench.num_filters)
    variants = {"SG-SAC": (sgqn.update, filters), "SAC": (sgqn.update, dict(filters, consistency_coef=0.0, aux_update_freq=0))}
    times = time_updates(variants, device, bench.batch_size, bench.pairs)
    sac = np.median(times["SAC"])
    print(f"\nupdate time, batch {bench.batch_size}, median of {bench.pairs} step pairs; the paired ratio is the median "
          f"over pairs of (variant / SAC), each timed next to the other")
    for label, seconds in times.items():
        print(f"  {label:<26}{np.median(seconds) * 1000:9.1f} ms   {np.median(seconds) / sac:5.2f} x SAC   "
              f"paired {np.median(seconds / times['SAC']):5.2f}   range {seconds.min() * 1000:.0f}-{seconds.max() * 1000:.0f} ms")
    print("\noperations dispatched per update (views excluded)")
    for label, (_, switches) in variants.items():
        print(f"  {label:<26}{count_operations(switches, device):9.1f}")
    if not bench.env_steps:
        return

    data_dir = Path(bench.data_dir) if bench.data_dir else envs.resolve_data_dir()
    if bench.fill_missing:
        data_dir = bench_envs.filled_data_dir(data_dir)
    try:
        end_to_end(bench, data_dir, variants)
    finally:
        if bench.fill_missing:
            shutil.rmtree(data_dir)  # symlinks only


def end_to_end(bench, data_dir, variants):
    speed = env_speed(("train", "video_hard"), bench.env_steps, data_dir)
    print(f"\nenvironment, cartpole, {bench.env_steps} agent steps at action repeat 4 after a warm-up episode")
    for mode, steps_per_second in speed.items():
        print(f"  {mode:<12}{steps_per_second:8.1f} steps/s   {steps_per_second / speed['train']:.2f} x train")

    b = bench.e2e_batch_size
    print(f"\nend to end, cartpole at action repeat 8: {b} seed steps, then {b} steps with one update each (batch {b}), "
          f"one evaluation episode on train and video_hard at step {b + b // 2}")
    for label, (_, switches) in variants.items():
        with tempfile.TemporaryDirectory() as out:
            args = sgqn.Args(env_id="cartpole", action_repeat=8, batch_size=b, learning_starts=b, total_timesteps=2 * b,
                             eval_freq=b + b // 2, eval_episodes=1, final_eval_episodes=1, eval_modes=("train", "video_hard"),
                             data_dir=str(data_dir), output_dir=out, cuda=bench.cuda, **switches)
            with contextlib.redirect_stdout(io.StringIO()):
                run_dir = sgqn.main(args)
            rows = list(map(json.loads, open(run_dir / "metrics.jsonl")))
            last = [row for row in rows if "sps" in row][-1]
            eval_hours = sum(row["eval_seconds"] for row in rows if "eval_seconds" in row) / 3600
        print(f"  {label:<26}{last['sps']:9.2f} agent steps/s (training)   evaluation {100 * eval_hours / last['elapsed_hours']:.0f}% of the run's time")


if __name__ == "__main__":
    main(tyro.cli(Bench))
