"""Cost of one checkpoint at the paper's sizes (not a test).

    python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --checkpoint-freq 1000 --steps-per-second 50

A checkpoint writes the networks, optimisers, random and environment states with one atomic torch.save, and
appends the frames added since the previous checkpoint to the run folder's replay files. The replay buffer here
has the paper's capacity (500k frames) and is as full as at the end of a paper run: `checkpoint_freq` new frames
after 495k older ones already on disk. The older frames are never rewritten, so the replay files are created
sparse at their offsets (only the new frames are written, as in a real run). Timed with fsync, on the disk of
--output-dir. The share is checkpoint time / (checkpoint_freq / steps per second), for each rate given.
"""

import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
import sgqn  # noqa: E402


@dataclass
class Bench:
    checkpoint_freq: int = sgqn.Args.checkpoint_freq
    """new frames per checkpoint (sgqn.py's default)"""
    buffer_size: int = 500_000
    """replay capacity in frames (the paper's)"""
    repeats: int = 5
    """checkpoints timed"""
    steps_per_second: tuple[float, ...] = (0.37, 9.0, 100.0)
    """training speeds to express the cost at: README's 2-core CPU, the authors' RTX 3090 (paper), a GPU goal"""
    output_dir: str | None = None
    """where to write (default: a temporary folder)"""


def main(bench):
    args = sgqn.Args(env_id="cartpole", eval_modes=envs.MODES[:1])
    env = envs.make_env("cartpole", args.seed, "train", args.action_repeat, args.frame_stack)
    eval_envs = {mode: envs.make_env("cartpole", args.seed + 42, "train", args.action_repeat, args.frame_stack) for mode in envs.MODES}
    for e in (env, *eval_envs.values()):
        e.reset()
    agent = sgqn.make_agent(env.observation_shape, env.action_shape[0], args, torch.device("cpu"))
    for step in (1, 2):  # fill the optimisers' state
        batch = (torch.rand(8, 9, 84, 84) * 255, torch.rand(8, 1), torch.rand(8, 1), torch.rand(8, 9, 84, 84) * 255)
        losses = sgqn.update(agent, batch, step, args, envs.procedural_images(8, 84, torch.Generator().manual_seed(0)))
    buffer = sgqn.ReplayBuffer(bench.buffer_size, (3, 84, 84), env.action_shape[0], args.frame_stack)
    frame, rng = np.random.default_rng(0).integers(0, 256, (3, 84, 84), dtype=np.uint8), np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=bench.output_dir) as folder:
        run_dir = Path(folder)
        metrics = open(run_dir / "metrics.jsonl", "a")
        seconds = []
        for repeat in range(bench.repeats + 1):  # the first one creates the files: not timed
            buffer.added = buffer.saved = bench.buffer_size - bench.checkpoint_freq * (bench.repeats + 1 - repeat)
            buffer.next = buffer.added % bench.buffer_size
            for _ in range(bench.checkpoint_freq):
                buffer.add(frame, np.zeros(1, np.float32), 0.0)
            start = time.perf_counter()
            progress = sgqn.Progress(step=buffer.added, losses={k: float(v) for k, v in losses.items()})
            sgqn.save_checkpoint(run_dir, agent, buffer, env, eval_envs, rng, metrics, args, progress)
            if repeat:
                seconds.append(time.perf_counter() - start)
        size = (run_dir / "checkpoint.pt").stat().st_size
        on_disk = sum(p.stat().st_blocks * 512 for p in (run_dir / "replay").iterdir())
    median = float(np.median(seconds))
    print(f"checkpoint at the paper's sizes: {median:.2f} s (median of {bench.repeats}, range {min(seconds):.2f}-{max(seconds):.2f} s); "
          f"checkpoint.pt {size / 1e6:.0f} MB, and {bench.checkpoint_freq} new frames appended to replay/ "
          f"({on_disk / (bench.repeats + 1) / 1e6:.0f} MB each time)")
    print(f"peak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    for rate in bench.steps_per_second:
        between = bench.checkpoint_freq / rate
        print(f"  at {rate:g} agent steps/s: a checkpoint every {between:,.0f} s, its cost {100 * median / between:.2f}% of that")
    print(json.dumps(dict(seconds=seconds, checkpoint_bytes=size)))


if __name__ == "__main__":
    main(tyro.cli(Bench))
