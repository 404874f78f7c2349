"""Speed of SG-SAC against plain SAC on the current device (not a test).

    python benchmarks/bench_update.py                        # update times, env steps/s, end-to-end steps/s
    python benchmarks/bench_update.py --data-dir ../shared/dmcgb --pairs 5

Update time: one gradient step at batch 128 with the real network sizes, after warm-up; the median over
`pairs` of (odd step + even step) / 2, so the every-2-steps parts (actor, temperature, target, aux) are
amortised. Plain SAC is the same script with both saliency mechanisms off (--consistency-coef 0
--aux-update-freq 0). The plain reference is test_sgqn.reference_update: the same algorithm written the
straightforward way (separate guided-backprop forward, captum-style module hooks, torch.quantile,
upsample-then-conv decoder), i.e. what the speed work started from.
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import envs  # noqa: E402
import sgqn  # noqa: E402


@dataclass
class Bench:
    pairs: int = 5
    """timed (odd, even) step pairs per variant, after one warm-up pair"""
    batch_size: int = 128
    """batch size of the update"""
    env_steps: int = 200
    """agent steps per environment mode"""
    train_steps: int = 30
    """agent steps of the end-to-end run (updates start after 10 seed steps)"""
    data_dir: str | None = None
    """DMC-GB data for the video_hard speed (default: envs.py's resolution)"""
    cuda: bool = True
    """use CUDA when available"""


def time_updates(step_fn, device, batch_size, pairs, **switches):
    torch.manual_seed(0)
    args = sgqn.Args(**switches)
    agent = sgqn.make_agent((9, 84, 84), 6, args, device)
    overlay = sgqn.procedural_images(256, 84, torch.Generator().manual_seed(0)).to(device)
    batch = (
        torch.randint(0, 256, (batch_size, 9, 84, 84), device=device).float(),
        torch.rand(batch_size, 6, device=device) * 2 - 1,
        torch.rand(batch_size, 1, device=device),
        torch.randint(0, 256, (batch_size, 9, 84, 84), device=device).float(),
    )
    times = []
    for pair in range(pairs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in (2 * pair + 1, 2 * pair + 2):
            losses = step_fn(agent, batch, step, args, overlay)
        float(losses["td"])  # wait for the device
        if pair > 0:  # the first pair warms up
            times.append((time.perf_counter() - start) / 2)
    return float(np.median(times))


def env_speed(mode, steps, data_dir):
    env = envs.make_env("cartpole", 0, mode, data_dir=data_dir)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, _, truncated, _ = env.step(rng.uniform(env.action_low, env.action_high))
        if truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def main(bench):
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")

    rows = {"SG-SAC": time_updates(sgqn.update, device, bench.batch_size, bench.pairs)}
    rows["SAC"] = time_updates(sgqn.update, device, bench.batch_size, bench.pairs, consistency_coef=0.0, aux_update_freq=0)
    try:
        from test_sgqn import reference_update

        rows["SG-SAC, plain reference"] = time_updates(reference_update, device, bench.batch_size, bench.pairs)
    except ImportError:
        pass
    print(f"\nupdate time, batch {bench.batch_size}, median of {bench.pairs} step pairs")
    for label, seconds in rows.items():
        print(f"  {label:<26}{seconds * 1000:9.1f} ms   {seconds / rows['SAC']:5.2f} x SAC")

    print(f"\nenvironment, cartpole, {bench.env_steps} agent steps at action repeat 4")
    train = env_speed("train", bench.env_steps, bench.data_dir)
    print(f"  {'train':<12}{train:8.1f} steps/s")
    try:
        hard = env_speed("video_hard", bench.env_steps, bench.data_dir)
        print(f"  {'video_hard':<12}{hard:8.1f} steps/s   {hard / train:.2f} x train")
    except (OSError, ValueError) as e:
        print(f"  video_hard skipped: {e}")

    with tempfile.TemporaryDirectory() as out:
        args = sgqn.Args(env_id="cartpole", total_timesteps=bench.train_steps, learning_starts=10, eval_freq=10**9,
                         eval_modes=("train",), final_eval_episodes=1, output_dir=out, cuda=bench.cuda)
        start = time.perf_counter()
        run_dir = sgqn.main(args)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        eval_seconds = sum(row.get("eval_seconds", 0) for row in rows)
        print(f"\nend to end, cartpole: {bench.train_steps} agent steps and as many updates in {seconds - eval_seconds:.0f} s "
              f"(set-up included, evaluation excluded): {bench.train_steps / (seconds - eval_seconds):.2f} steps/s")


if __name__ == "__main__":
    main(tyro.cli(Bench))
