"""Where a test scene gets into a trained agent (a diagnostic, not a test): the same states in two scenes.

    python benchmarks/probe_scenes.py runs/<sg-sac run> runs/<sac run> --mode video_hard

For each run folder's checkpoint, runs the deterministic policy on the training scene for --episodes episodes and
steps a second env, of the test --mode, in lockstep with the same actions from the same initial state: both
render the same physical states (checked at every step), so whatever differs between the two observations is
the scene. Prints a markdown row per checkpoint, means over the steps:
  return             the training scene's episode return (the policy drives on that scene)
  Q1                 Q1(train obs, a) at the policy's action a, the critic's scale
  Q1 shift           |Q1(test obs, a) - Q1(train obs, a)|
  Q1 shift, masked   |Q1(test obs masked, a) - Q1(train obs, a)|, the test obs masked by its own rho-saliency mask
                     as in the consistency loss: small if the critic's saliency finds what matters on the test scene
  action shift       |a(test obs) - a(train obs)|, actions in [-1, 1]: what the scene does to the policy
  and the relative change |x(test) - x(train)| / |x(train)| of the shared conv features and of the critic's and
  the actor's own projections of them, to see where on the way to Q and to the action the scene is filtered out.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
import sgqn  # noqa: E402


@dataclass
class Probe:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run folders of sgqn.py, each with a checkpoint.pt"""
    mode: str = "video_hard"
    """the test scene compared with the training scene"""
    episodes: int = 2
    """episodes per checkpoint (the env seed is the run's seed + 42, as its evaluation envs)"""
    data_dir: str | None = None
    """DMC-GB data folder (default: each run's own --data-dir)"""


def relative_change(train, test):
    return ((test - train).norm(dim=1) / train.norm(dim=1)).item()


def probe(agent, train_obs, test_obs, rho):
    """The per-step measures of the docstring for one pair of observations (9, 84, 84) uint8 of the same state."""
    obs = torch.as_tensor(np.stack([train_obs, test_obs])).float()  # (2, 9, 84, 84): train, test
    with torch.no_grad():
        features = agent.critic.encoder(obs)
        action, _, _ = agent.actor(features)  # tanh of the mean: the evaluated policy
        q1, _ = agent.critic.heads(features, action[:1].expand_as(action))  # both at the training scene's action
        critic_projection, actor_projection = agent.critic.projection(features), agent.actor.projection(features)
    saliency = sgqn.saliency_mask(sgqn.guided_backprop(agent.critic, obs[1:], action[:1]), rho)  # (1, 9, 84, 84) 0/1
    with torch.no_grad():
        masked_q1, _ = agent.critic(sgqn.mask_observation(obs[1:], saliency), action[:1])
    return action[0].numpy(), {
        "Q1": q1[0].item(), "Q1 shift": (q1[1] - q1[0]).abs().item(), "Q1 shift, masked": (masked_q1[0] - q1[0]).abs().item(),
        "action shift": (action[1] - action[0]).norm().item(),
        "conv features": relative_change(features[:1], features[1:]),
        "critic projection": relative_change(critic_projection[:1], critic_projection[1:]),
        "actor projection": relative_change(actor_projection[:1], actor_projection[1:]),
    }


def paired_rollouts(agent, train_env, test_env, episodes, rho):
    """-> ([episode returns on the training scene], {measure: mean over all steps})."""
    returns, steps = [], []
    for _ in range(episodes):
        (train_obs, _), (test_obs, _) = train_env.reset(), test_env.reset()
        total, done = 0.0, False
        while not done:
            if not torch.equal(train_env.get_state()["physics"], test_env.get_state()["physics"]):
                sys.exit(f"error: the {test_env.mode} env's physics left the training env's at step {len(steps)}; "
                         "the scenes must differ only in how they look")
            action, measures = probe(agent, train_obs, test_obs, rho)
            steps.append(measures)
            train_obs, reward, terminated, truncated, _ = train_env.step(action)
            test_obs, *_ = test_env.step(action)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return returns, {name: float(np.mean([s[name] for s in steps])) for name in steps[0]}


def main(probe_args):
    if not probe_args.run_dirs:
        sys.exit("error: give one or more run folders of sgqn.py (each with a checkpoint.pt)")
    if probe_args.episodes < 1:
        sys.exit(f"error: --episodes must be at least 1, got {probe_args.episodes}")
    rows = []
    for run_dir in map(Path, probe_args.run_dirs):
        saved = sgqn.read_checkpoint(run_dir / "checkpoint.pt", "run folder")
        args = sgqn.Args(**saved["args"])
        data_dir = probe_args.data_dir or args.data_dir
        try:
            pair = [envs.make_env(args.env_id, args.seed + 42, mode, args.action_repeat, args.frame_stack, data_dir=data_dir)
                    for mode in ("train", probe_args.mode)]
        except (envs.DataError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        agent = sgqn.make_agent(pair[0].observation_shape, pair[0].action_shape[0], args, torch.device("cpu"))
        sgqn.load_agent(agent, saved, run_dir / "checkpoint.pt")
        torch.manual_seed(0)  # the masks' fill values
        returns, measures = paired_rollouts(agent, *pair, probe_args.episodes, args.rho)
        rows.append((f"{run_dir.name} (step {saved['progress']['step']})", {"return": float(np.mean(returns)), **measures}))
    print(f"the same states on train and {probe_args.mode}, {probe_args.episodes} episodes per checkpoint")
    names = list(rows[0][1])
    print(f"| checkpoint | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for label, measures in rows:
        print(f"| {label} | {' | '.join(f'{measures[n]:.3f}' for n in names)} |")


if __name__ == "__main__":
    main(tyro.cli(Probe))
