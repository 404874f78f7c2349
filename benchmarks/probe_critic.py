"""What trained critics look at, measured on the same replayed transitions (a diagnostic, not a test).

    python benchmarks/probe_critic.py runs/<sg-sac run> runs/<sac run>   # both critics on the first run's transitions
    python benchmarks/probe_critic.py runs/<run> --replay runs/<other run> --samples 1024

Loads each run folder's checkpoint.pt and evaluates its critic on one batch of transitions drawn (unaugmented)
from the replay buffer of --replay (default: the first run), read-only, so a running run can be probed. Prints a
markdown row per checkpoint, means over the batch:
  Q1                 Q1(s, a), the critic's scale
  Q1 - target        the TD error, target = r + gamma * (min target Q - alpha log pi) as in training
  consistency gap    |Q1(s, a) - Q1(s masked, a)|: how much Q1 changes when every pixel outside its own
                     rho-saliency mask is replaced, as in the consistency loss (which drives it to 0)
  action gradient    the norm of dQ1/da at the policy's mean action: the actor's learning signal
  Q1 spread          the std of Q1 over the batch's states
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sgqn  # noqa: E402


@dataclass
class Probe:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run folders of sgqn.py, each with a checkpoint.pt"""
    replay: str | None = None
    """the run folder whose replay buffer gives the transitions (default: the first run folder)"""
    samples: int = 512
    """transitions in the batch"""
    seed: int = 0
    """seed of the batch's draw and of the masks' fill values"""


def shapes(saved, args):
    """-> (frame shape (3, H, W), action dim) of the run a checkpoint comes from."""
    frame_shape = tuple(saved["env"]["frames"].shape[1:])  # the training env's frame stack, (k, 3, H, W)
    return frame_shape, saved["critic"]["q1.0.weight"].shape[1] - args.projection_dim  # Q1's input: [projection, action]


def read_replay(run_dir, saved, args):
    """The run's replay buffer as its checkpoint left it, on read-only views of its files (nothing is copied or
    written, so a running run can be probed): the newest min(frames added, capacity) entries, slot 0 the oldest."""
    frame_shape, action_dim = shapes(saved, args)
    buffer = sgqn.ReplayBuffer(1, frame_shape, action_dim, args.frame_stack)
    added = saved["buffer_added"]
    n = min(added, args.buffer_size)  # older entries were evicted from the ring: holes in the files
    for name in ("frames", "actions", "rewards", "t"):
        entry = getattr(buffer, name)[0]
        view = np.memmap(Path(run_dir) / "replay" / f"{name}.bin", entry.dtype, "r", (added - n) * entry.nbytes, (n, *entry.shape))
        setattr(buffer, name, view)
    buffer.capacity, buffer.next, buffer.size = n, 0, n
    return buffer


def probe(agent, batch, rho, gamma):
    """The measures of the docstring for one critic on one batch (obs float (B, 9, 84, 84)) -> {name: float}."""
    obs, action, reward, next_obs = batch
    critic = agent.critic
    saliency = sgqn.saliency_mask(sgqn.guided_backprop(critic, obs, action), rho)  # (B, 9, 84, 84) 0/1
    with torch.no_grad():
        _, next_action, next_log_prob = agent.actor(critic.encoder(next_obs))
        target = reward + gamma * (torch.min(*agent.critic_target(next_obs, next_action)) - agent.log_alpha.exp() * next_log_prob)
        features = critic.encoder(obs)  # (B, conv features), shared by Q1 and the policy's action
        q1, _ = critic.heads(features, action)
        masked_q1, _ = critic(sgqn.mask_observation(obs, saliency), action)
        mean_action, _, _ = agent.actor(features)
    mean_action.requires_grad_(True)
    q1_at_mean, _ = critic.heads(features, mean_action)
    (action_gradient,) = torch.autograd.grad(q1_at_mean.sum(), mean_action)  # samples do not interact
    return {"Q1": q1.mean().item(), "Q1 - target": (q1 - target).mean().item(), "consistency gap": (q1 - masked_q1).abs().mean().item(),
            "action gradient": action_gradient.norm(dim=1).mean().item(), "Q1 spread": q1.std().item()}


def main(probe_args):
    if not probe_args.run_dirs:
        sys.exit("error: give one or more run folders of sgqn.py (each with a checkpoint.pt)")
    runs = [(Path(run_dir), sgqn.read_checkpoint(Path(run_dir) / "checkpoint.pt", "run folder")) for run_dir in probe_args.run_dirs]
    replay_dir = Path(probe_args.replay) if probe_args.replay else runs[0][0]
    replay_saved = runs[0][1] if replay_dir == runs[0][0] else sgqn.read_checkpoint(replay_dir / "checkpoint.pt", "--replay")
    buffer = read_replay(replay_dir, replay_saved, sgqn.Args(**replay_saved["args"]))
    obs, action, reward, next_obs = buffer.sample(probe_args.samples, np.random.default_rng(probe_args.seed))
    batch = (torch.as_tensor(obs).float(), torch.as_tensor(action), torch.as_tensor(reward)[:, None], torch.as_tensor(next_obs).float())
    print(f"{probe_args.samples} transitions of {replay_dir} (step {replay_saved['progress']['step']}), unaugmented")
    rows = []
    for run_dir, saved in runs:
        args = sgqn.Args(**saved["args"])
        frame_shape, action_dim = shapes(saved, args)
        agent = sgqn.make_agent((3 * args.frame_stack, *frame_shape[1:]), action_dim, args, torch.device("cpu"))
        sgqn.load_agent(agent, saved, run_dir / "checkpoint.pt")
        torch.manual_seed(probe_args.seed)  # the masks' fill values
        rows.append((f"{run_dir.name} (step {saved['progress']['step']}, rho {args.rho})", probe(agent, batch, args.rho, args.gamma)))
    names = list(rows[0][1])
    print(f"| checkpoint | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for label, measures in rows:
        print(f"| {label} | {' | '.join(f'{measures[n]:.2f}' for n in names)} |")


if __name__ == "__main__":
    main(tyro.cli(Probe))
