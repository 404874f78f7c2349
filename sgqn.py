"""SG-SAC: Soft Actor-Critic from pixels with saliency-guided Q-networks (SGQN).

Bertoin, Zouitine, Zouitine, Rachelson. "Look where you look! Saliency-guided Q-networks for
generalization in visual reinforcement learning", NeurIPS 2022.

SAC learns from 84x84 pixels on the plain DeepMind Control scene; SGQN makes the critic look at the right pixels,
so that the agent generalises zero-shot to the DMControl Generalization Benchmark scenes (color_easy, color_hard,
video_easy, video_hard), with two losses (2, 3) built on the critic's own saliency (1):
  1. attribution: guided backpropagation of Q1 with respect to the observation; the saliency mask keeps, per
     frame, the pixels whose attribution is at or above the rho-quantile;
  2. consistency: Q on the full and on the masked observation should agree (weight `consistency_coef`);
  3. self-supervision: an attribution decoder on the critic's encoder predicts the mask from an overlay-augmented
     observation (binary cross-entropy, every `aux_update_freq` steps).

Usage:
    python sgqn.py --env-id cartpole --rho 0.98          # train, evaluate on every DMC-GB mode
    python sgqn.py --env-id walker-stand --rho 0.95 --consistency-coef 0 --aux-update-freq 0  # plain SAC
    python sgqn.py --resume runs/<run>                   # continue an interrupted run exactly (Ctrl-C saves)
    python sgqn.py --checkpoint runs/<run>/checkpoint.pt --eval-only   # with the checkpoint's own settings

Where we differ from the authors' code (SuReLI/SGQN, DMC/), on purpose:
  - Guided backprop runs once per step, on the critic's own forward of obs before the critic step: its mask
    serves the consistency term and the aux target, and the actor reuses that forward's detached conv features
    (the authors run guided backprop before and after the critic step and encode obs again for the actor).
    Fewer encoder passes; the aux target and the actor's features come from weights one critic step older.
  - Same results, faster: the mask threshold from one topk instead of torch.quantile's sort; the decoder's
    upsample-then-conv as one transposed conv (`upsample_conv`); fused Adam (other float rounding only).
  - Overlay images: a pool loaded once onto the device (random flips per draw) instead of a Places365
    DataLoader with RandomResizedCrop; without --overlay-dir, procedural 1/f-spectrum images (envs.py).
  - The replay buffer stores each frame once and rebuilds stacks by index (11 GB for 500k steps, not 60+).
  - The final evaluation has 100 episodes per mode, as DMC-GB's published protocol (the authors use 30).
  - A run checkpoints all it depends on, and --resume continues it bit for bit.
"""

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import envs

NUM_CONV_LAYERS = 11  # the only depth at 84x84 whose 21x21 output the decoder's two x2 upsamplings turn back into 84x84
LOG_STD_MIN, LOG_STD_MAX = -10.0, 2.0  # the actor's log-std bounds (authors' code)


@dataclass
class Args:  # every field is a flag (--env-id, --rho, ...); its comment is its --help
    env_id: str = "cartpole"  # a domain for its default task (cartpole, walker, finger, ...) or domain-task
    rho: float = 0.98  # saliency quantile: the mask keeps pixels at or above it (0.98 cartpole, 0.95 walker/finger)
    seed: int = 1  # seed of the agent and the training env (test envs use seed + 42, as DMC-GB)
    total_timesteps: int = 500_000  # agent steps to train for (simulator frames = agent steps * action_repeat)
    action_repeat: int = 4  # simulator steps per agent step (4 in the paper; 8 cartpole, 2 finger in its appendix)
    frame_stack: int = 3  # consecutive RGB frames per observation
    buffer_size: int = 500_000  # replay capacity, in frames (one frame per transition)
    batch_size: int = 128  # transitions per gradient update
    gamma: float = 0.99  # discount factor
    learning_starts: int = 1000  # random-action seed steps; at the last one, as many updates as seed steps
    actor_lr: float = 1e-3  # actor Adam learning rate (betas 0.9, 0.999)
    critic_lr: float = 1e-3  # critic Adam learning rate (betas 0.9, 0.999)
    alpha_lr: float = 1e-4  # temperature Adam learning rate (betas 0.5, 0.999)
    init_temperature: float = 0.1  # initial entropy temperature alpha
    aux_lr: float = 3e-4  # Adam learning rate of the attribution predictor (decoder and shared encoder)
    critic_tau: float = 0.01  # Polyak rate of the target Q heads
    encoder_tau: float = 0.05  # Polyak rate of the target encoder (conv stack and critic projection)
    actor_update_freq: int = 2  # actor, temperature and target updates every this many steps
    consistency_coef: float = 0.5  # weight lambda of the consistency loss Q(s) vs Q(masked s); 0 turns it off
    aux_update_freq: int = 2  # self-supervised attribution-prediction step every this many steps; 0 turns it off
    shift_pad: int = 4  # random-shift augmentation padding (replicate), on obs and next_obs
    overlay_alpha: float = 0.5  # overlay augmentation: (1 - alpha) * obs + alpha * image, for the auxiliary input
    overlay_dir: str | None = None  # JPEG/PNG images to overlay (Places365 reproduces the paper); none: procedural
    overlay_images: int = 10_000  # overlay images kept on the device (loaded once)
    num_filters: int = 32  # filters per conv layer
    projection_dim: int = 100  # size of the actor's and critic's projections
    hidden_dim: int = 1024  # hidden units of the actor and Q heads
    eval_freq: int = 10_000  # evaluate every this many agent steps (and at step 0)
    eval_episodes: int = 10  # episodes per mode in the periodic evaluations
    final_eval_episodes: int = 100  # episodes per mode in the final evaluation (DMC-GB protocol)
    eval_modes: tuple[str, ...] = envs.MODES  # scenes to evaluate on
    data_dir: str | None = None  # DMC-GB data (default: $DMCGB_DATA_DIR, else a user cache; downloads what is missing)
    output_dir: str = "runs"  # parent folder of the run folder
    cuda: bool = True  # use CUDA when available
    checkpoint_freq: int = 5000  # checkpoint every this many agent steps (and before each evaluation and on Ctrl-C)
    resume: str | None = None  # continue the run in this folder exactly (--total-timesteps may extend it)
    checkpoint: str | None = None  # with --eval-only: evaluate it with its own settings; alone: initialise the agent
    eval_only: bool = False  # only evaluate --checkpoint, final_eval_episodes episodes per eval mode


# ---------------------------------------------------------------- augmentations
def random_shift(x, pad):
    """Shift each image by up to `pad` pixels with replicate padding, as DrQ. x: (B, C, H, W), any dtype.
    Replicate padding then cropping equals clamping the source indices, so no padded copy is made."""
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), device=x.device) - pad
    rows = (dy + torch.arange(h, device=x.device)).clamp(0, h - 1)[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w, device=x.device)).clamp(0, w - 1)[:, None, :]  # (B, 1, W)
    return x[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_overlay(x, images, alpha):
    """(1 - alpha) * x + alpha * image, one random image per sample, repeated over its frames.
    x: (B, 3k, H, W) float in [0, 255]; images: (N, 3, H, W) uint8."""
    picked = images[torch.randint(len(images), (len(x),), device=x.device)]  # (B, 3, H, W)
    flip = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
    picked = torch.where(flip, picked.flip(-1), picked).float()
    return (1 - alpha) * x + alpha * picked.repeat(1, x.shape[1] // 3, 1, 1)


# ---------------------------------------------------------------- saliency
@contextlib.contextmanager
def guided_relus(critic):
    """Guided backpropagation: while active, each critic ReLU's output clamps its incoming gradient at 0 (captum's
    GuidedBackprop, the authors' tool); on exit the hooks go, so the critic loss later gets ordinary gradients."""
    hooks = []

    def clamp_gradient(module, inputs, output):
        hooks.append(output.register_hook(lambda grad: grad.clamp(min=0)))

    hooks += [m.register_forward_hook(clamp_gradient) for m in critic.modules() if isinstance(m, nn.ReLU)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def guided_backprop(critic, obs, action):
    """Attribution of Q1(obs, action) w.r.t. obs (the raw 0-255 input) by guided backprop. Leaves no hook and
    no parameter .grad. obs: (B, 9, 84, 84) float -> (B, 9, 84, 84)."""
    obs = obs.detach().requires_grad_(True)
    with guided_relus(critic):
        q1 = critic.q1(torch.cat([critic.projection(critic.encoder(obs)), action], 1))  # Q2 is not needed
        (attribution,) = torch.autograd.grad(q1.sum(), obs)  # samples do not interact: the sum is harmless
    return attribution


def saliency_mask(attribution, rho):
    """Per sample and frame: 1 where max over RGB of |attribution| >= its rho-quantile over the frame's pixels,
    repeated over the frame's 3 channels. (B, 3k, H, W) -> (B, 3k, H, W) float 0/1. Exactly the authors'
    `m >= torch.quantile(m, rho)` for NaN-free maps: the threshold is torch.quantile's (rank rho * (n - 1), lerp
    between the order statistics at its floor and ceil), from one topk of the top 2%, 7x faster than a full sort."""
    b, c, h, w = attribution.shape
    per_frame = attribution.abs().view(b, c // 3, 3, h * w).amax(2)  # (B, k, H*W)
    rank = torch.tensor(rho, dtype=per_frame.dtype) * (h * w - 1)  # on the host, as torch.quantile's arithmetic
    below, weight = int(rank), float(rank - int(rank))
    top = per_frame.topk(h * w - below, dim=2).values  # (B, k, n - below), descending: ends with sorted[below]
    above = top[..., -2:-1] if weight > 0 else top[..., -1:]  # sorted[below + 1]
    threshold = torch.lerp(top[..., -1:], above, weight)  # (B, k, 1)
    return (per_frame >= threshold).float().view(b, c // 3, 1, h, w).expand(b, c // 3, 3, h, w).reshape(b, c, h, w)


def mask_observation(obs, mask):
    """Keep the salient pixels; fill the others with one value drawn uniformly in [batch min, batch max]."""
    lo, hi = torch.aminmax(obs)
    fill = lo + torch.rand((), device=obs.device) * (hi - lo)
    return torch.where(mask > 0, obs, fill)


# ---------------------------------------------------------------- networks
def weight_init(m):
    """Orthogonal Linear; delta-orthogonal conv (only the centre tap, relu gain); zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        mid = m.weight.shape[2] // 2
        nn.init.orthogonal_(m.weight.data[:, :, mid, mid], nn.init.calculate_gain("relu"))


def mlp(in_dim, hidden_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, out_dim))


def projection(in_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.Tanh())


class Encoder(nn.Module):
    """Shared conv stack: (B, 9, 84, 84) in [0, 255] -> (B, 32 * 21 * 21). No ReLU after the last conv."""

    def __init__(self, obs_shape, num_layers, num_filters):
        super().__init__()
        layers = [nn.Conv2d(obs_shape[0], num_filters, 3, stride=2)]
        for _ in range(num_layers - 1):
            layers += [nn.ReLU(), nn.Conv2d(num_filters, num_filters, 3, stride=1)]
        self.convs = nn.Sequential(*layers)
        self.apply(weight_init)
        with torch.no_grad():
            self.out_shape = tuple(self.convs(torch.zeros(1, *obs_shape)).shape[1:])  # (32, 21, 21)
        self.out_dim = math.prod(self.out_shape)

    def forward(self, obs):
        return self.convs(obs / 255.0).flatten(1)


class Critic(nn.Module):
    """Double Q on [projection(encoder(obs)), action]. The encoder is shared with the actor."""

    def __init__(self, encoder, action_dim, projection_dim, hidden_dim):
        super().__init__()
        self.encoder = encoder
        self.projection = projection(encoder.out_dim, projection_dim)
        self.q1 = mlp(projection_dim + action_dim, hidden_dim, 1)
        self.q2 = mlp(projection_dim + action_dim, hidden_dim, 1)
        for module in (self.projection, self.q1, self.q2):
            module.apply(weight_init)

    def heads(self, features, action):
        """Q1, Q2 from conv features (B, 14112) and action (B, A)."""
        x = torch.cat([self.projection(features), action], 1)
        return self.q1(x), self.q2(x)

    def forward(self, obs, action):
        return self.heads(self.encoder(obs), action)


class Actor(nn.Module):
    """Tanh-Gaussian policy on the shared encoder's conv features; its projection and trunk are its own."""

    def __init__(self, features_dim, action_dim, projection_dim, hidden_dim):
        super().__init__()
        self.projection = projection(features_dim, projection_dim)
        self.trunk = mlp(projection_dim, hidden_dim, 2 * action_dim)
        self.apply(weight_init)

    def forward(self, features):
        """-> tanh(mean) (B, A), sampled action (B, A), its log-probability (B, 1)."""
        mean, log_std = self.trunk(self.projection(features)).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        noise = torch.randn_like(mean)
        pi = mean + noise * log_std.exp()
        log_prob = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True) - 0.5 * math.log(2 * math.pi) * noise.shape[-1]
        pi = torch.tanh(pi)
        log_prob -= torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)  # tanh change of variables
        return torch.tanh(mean), pi, log_prob


def upsample_conv(x, conv):
    """conv(nearest_upsample_x2(x)) for a 3x3 conv with padding 1 as one stride-2 transposed conv (4x4): per axis,
    output 2r sees x[r-1] by tap 0 and x[r] by taps 1 + 2; 2r+1 sees x[r] by taps 0 + 1 and x[r+1] by tap 2. Same
    result up to rounding, 2.25x fewer multiply-adds. (B, I, H, W) -> (B, O, 2H, 2W)."""
    # fold[a, k]: the conv taps k summed into transposed tap a, which carries x[i] to output 2i + a - 1
    fold = x.new_tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    kernel = torch.einsum("ak,oikl,bl->ioab", fold, conv.weight, fold)  # (I, O, 4, 4)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


class AttributionDecoder(nn.Module):
    """Saliency-mask logits (B, 9, 84, 84) from [critic projection, action]: linear to the encoder's (32, 21, 21),
    conv 128, upsample x2, conv 64, upsample x2, conv 9 (ReLU between). PyTorch's default init, as the authors'."""

    def __init__(self, encoder_shape, obs_shape, action_dim, projection_dim):
        super().__init__()
        self.encoder_shape = encoder_shape  # (32, 21, 21)
        self.linear = nn.Linear(projection_dim + action_dim, math.prod(encoder_shape))
        self.conv1 = nn.Conv2d(encoder_shape[0], 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, obs_shape[0], 3, padding=1)

    def forward(self, projected, action):
        x = F.relu(self.linear(torch.cat([projected, action], 1)).view(-1, *self.encoder_shape))  # (B, 32, 21, 21)
        x = F.relu(self.conv1(x))  # (B, 128, 21, 21); ReLU and nearest upsampling commute
        x = F.relu(upsample_conv(x, self.conv2))  # (B, 64, 42, 42)
        return upsample_conv(x, self.conv3)  # (B, 9, 84, 84)


# ---------------------------------------------------------------- replay buffer
class ReplayBuffer:
    """Every rendered frame once, uint8, in a ring; stacks are rebuilt by index. Slot j holds frame t of an episode
    and, for t >= 1, the action and reward that led to it: (stack(t-1), a, r, stack(t)), stack(t) = frames t-k+1..t."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack):
        self.frames = np.empty((capacity, *frame_shape), np.uint8)  # (N, 3, 84, 84): 21 kB a frame
        self.actions = np.empty((capacity, action_dim), np.float32)
        self.rewards = np.empty(capacity, np.float32)
        self.t = np.zeros(capacity, np.int64)  # frame index within its episode
        self.capacity, self.frame_stack, self.next, self.size = capacity, frame_stack, 0, 0
        self.added = self.saved = 0  # frames added in the whole run, and how many of them are on disk (--resume)

    def add(self, frame, action=None, reward=0.0, first=False):
        """Add the newest frame: `first` at reset, else with the action and reward that led to it."""
        j = self.next
        self.frames[j] = frame
        self.t[j] = 0 if first else self.t[j - 1] + 1
        self.actions[j], self.rewards[j] = (0.0, 0.0) if first else (action, reward)  # a reset frame has none
        self.next, self.size, self.added = (j + 1) % self.capacity, min(self.size + 1, self.capacity), self.added + 1

    def _stack(self, j, t):
        offsets = np.minimum(np.arange(self.frame_stack - 1, -1, -1), t[:, None])  # (B, k), oldest first
        frames = self.frames[(j[:, None] - offsets) % self.capacity]  # (B, k, 3, 84, 84)
        return frames.reshape(len(j), -1, *frames.shape[3:])  # (B, 3k, 84, 84)

    def sample(self, batch_size, rng):
        """-> obs, action, reward, next_obs as numpy; obs uint8 (B, 3k, 84, 84)."""
        j = rng.integers(0, self.size, batch_size)
        age = (self.next - 1 - j) % self.capacity
        # a transition needs t >= 1 and all of its k+1 frames still in the ring
        while (bad := (self.t[j] == 0) | (age + np.minimum(self.t[j], self.frame_stack) >= self.size)).any():
            j[bad] = rng.integers(0, self.size, bad.sum())
            age = (self.next - 1 - j) % self.capacity
        t = self.t[j]
        return self._stack((j - 1) % self.capacity, t - 1), self.actions[j], self.rewards[j], self._stack(j, t)


# ---------------------------------------------------------------- evaluation
def act(encoder, actor, obs, device, deterministic):
    with torch.no_grad():
        mean, pi, _ = actor(encoder(torch.as_tensor(obs, device=device).float()[None]))
    return (mean if deterministic else pi)[0].cpu().numpy()


def evaluate(env, encoder, actor, episodes, device, frames_out=None):
    """Yields the return of each episode of the mean action; frames_out (a list) gets the first episode's obs."""
    for episode in range(episodes):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            if frames_out is not None and episode == 0:
                frames_out.append(obs)
            obs, reward, terminated, truncated, _ = env.step(act(encoder, actor, obs, device, deterministic=True))
            total, done = total + reward, terminated or truncated
        yield total


# ---------------------------------------------------------------- training
@dataclass
class Agent:
    critic: Critic  # owns the shared encoder (critic.encoder)
    critic_target: Critic
    actor: Actor
    decoder: AttributionDecoder
    log_alpha: torch.Tensor
    critic_optimizer: torch.optim.Optimizer
    actor_optimizer: torch.optim.Optimizer
    alpha_optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer


def make_agent(obs_shape, action_dim, args, device):
    encoder = Encoder(obs_shape, NUM_CONV_LAYERS, args.num_filters).to(device)
    critic = Critic(encoder, action_dim, args.projection_dim, args.hidden_dim).to(device)
    actor = Actor(encoder.out_dim, action_dim, args.projection_dim, args.hidden_dim).to(device)
    decoder = AttributionDecoder(encoder.out_shape, obs_shape, action_dim, args.projection_dim).to(device)
    log_alpha = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    # the attribution predictor is the critic's encoder and projection + the decoder: its step trains them all
    aux_parameters = [*encoder.parameters(), *critic.projection.parameters(), *decoder.parameters()]
    # fused: one kernel per parameter group, not ten per parameter (a GPU's launch budget); meta (the tests) has none
    adam = functools.partial(torch.optim.Adam, fused=device.type != "meta")
    return Agent(critic, copy.deepcopy(critic), actor, decoder, log_alpha,  # the target has its own encoder copy
                 adam(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.999)),
                 adam(actor.parameters(), lr=args.actor_lr, betas=(0.9, 0.999)),
                 adam([log_alpha], lr=args.alpha_lr, betas=(0.5, 0.999)),
                 adam(aux_parameters, lr=args.aux_lr, betas=(0.9, 0.999)))


def update(agent, batch, step, args, overlay):
    """One SG-SAC gradient step on an augmented batch; returns its losses (tensors). Encoder passes: 4 forwards
    (obs, masked obs, next_obs for the actor and the target), 5 on aux steps (overlaid obs), and one guided backward;
    the authors' code makes 6 forwards on odd steps, 9 on even ones, and 2 guided backwards."""
    obs, action, reward, next_obs = batch  # (B, 9, 84, 84) float, (B, A), (B, 1), (B, 9, 84, 84)
    critic, actor, encoder, log_alpha = agent.critic, agent.actor, agent.critic.encoder, agent.log_alpha
    aux_step = args.aux_update_freq > 0 and step % args.aux_update_freq == 0
    losses = {}

    # critic forward on obs, which also yields the guided-backprop attribution (the hooks shape only its backward)
    need_saliency = args.consistency_coef > 0 or aux_step
    with guided_relus(critic) if need_saliency else contextlib.nullcontext():
        obs = obs.detach().requires_grad_(need_saliency)
        features = encoder(obs)  # (B, 14112)
        q1, q2 = critic.heads(features, action)
        if need_saliency:
            (attribution,) = torch.autograd.grad(q1.sum(), obs, retain_graph=True)
            saliency = saliency_mask(attribution, args.rho)  # (B, 9, 84, 84) 0/1, also the aux target
    obs = obs.detach()

    # critic: TD loss + lambda * consistency between Q(s) and Q(masked s)
    with torch.no_grad():
        _, next_action, next_log_prob = actor(encoder(next_obs))
        target_q1, target_q2 = agent.critic_target(next_obs, next_action)
        # DMC episodes end only by the time limit, so the target always bootstraps
        target_q = reward + args.gamma * (torch.min(target_q1, target_q2) - log_alpha.exp() * next_log_prob)
    losses["consistency"] = torch.zeros((), device=obs.device)
    if args.consistency_coef > 0:
        masked_q1, masked_q2 = critic(mask_observation(obs, saliency), action)
        losses["consistency"] = F.mse_loss(q1, masked_q1) + F.mse_loss(q2, masked_q2)  # Q(s) is not detached
    losses["td"] = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
    losses["q"] = q1.mean()  # the critic's scale, for the logs (about action_repeat / (1 - gamma) at most in DMC)
    critic_loss = losses["td"] + args.consistency_coef * losses["consistency"]
    agent.critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward(inputs=list(critic.parameters()))  # no gradient for obs
    agent.critic_optimizer.step()

    if step % args.actor_update_freq == 0:
        # actor and temperature, on the critic step's conv features (detached: the convs are not the actor's)
        features = features.detach()
        _, pi, log_prob = actor(features)
        actor_q1, actor_q2 = critic.heads(features, pi)
        losses["actor"] = (log_alpha.exp().detach() * log_prob - torch.min(actor_q1, actor_q2)).mean()
        agent.actor_optimizer.zero_grad(set_to_none=True)
        losses["actor"].backward(inputs=list(actor.parameters()))  # no gradient is computed for the critic
        agent.actor_optimizer.step()
        target_entropy = -pi.shape[1]  # -|A|
        losses["alpha_loss"] = (log_alpha.exp() * (-log_prob - target_entropy).detach()).mean()
        agent.alpha_optimizer.zero_grad(set_to_none=True)
        losses["alpha_loss"].backward()
        agent.alpha_optimizer.step()
        losses["alpha"] = log_alpha.detach().exp()

        # Polyak averaging, target = (1 - tau) * target + tau * online; the encoder includes the critic's projection
        with torch.no_grad():
            for name, tau in (("encoder", args.encoder_tau), ("projection", args.encoder_tau),
                              ("q1", args.critic_tau), ("q2", args.critic_tau)):
                online, target = getattr(critic, name), getattr(agent.critic_target, name)
                torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)

    if aux_step:
        # self-supervision: predict the saliency mask of obs from the overlay-augmented obs
        overlaid = random_overlay(obs, overlay, args.overlay_alpha)
        logits = agent.decoder(critic.projection(encoder(overlaid)), action)  # (B, 9, 84, 84)
        losses["aux"] = F.binary_cross_entropy_with_logits(logits, saliency)
        agent.aux_optimizer.zero_grad(set_to_none=True)
        losses["aux"].backward()
        agent.aux_optimizer.step()
    return {name: loss.detach() for name, loss in losses.items()}


# ================================================================ run machinery
# Settings and their checks, run folders, exact resume, signals, the loop: a copy of SG-SAC needs none of it.
CHECKPOINT_FORMAT = "sgqn.py checkpoint 3"
RESUME_MAY_CHANGE = ("resume", "total_timesteps", "data_dir", "output_dir", "cuda")  # the rest is what the run is
EVAL_ONLY_FLAGS = ("checkpoint", "eval_only", "eval_modes", "final_eval_episodes", "data_dir", "output_dir", "cuda")
LOWER_BOUNDS = {"aux_update_freq": 0, "shift_pad": 0, "seed": 0}  # every other integer flag counts something: >= 1
RANGES = {  # float flags: (low, high, which ends are allowed)
    "rho": (0, 1, "()"), "gamma": (0, 1, "(]"), "critic_tau": (0, 1, "[]"), "encoder_tau": (0, 1, "[]"),
    "overlay_alpha": (0, 1, "[]"), "init_temperature": (0, math.inf, "()"), "consistency_coef": (0, math.inf, "[)"),
    **dict.fromkeys(("actor_lr", "critic_lr", "alpha_lr", "aux_lr"), (0, math.inf, "[)"))}
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)  # faults, not bugs


def fail(message, status=1):
    """Stop with one line `error: ...` and no traceback: status 2 for a bad argument (argparse's), 1 otherwise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv):
    """-> (args, checkpoint or None). --resume and --eval-only run with the checkpoint's settings (read once)."""
    args = tyro.cli(Args, args=argv)
    if not (args.resume or args.eval_only and args.checkpoint):
        return args, None
    own, source, what = (RESUME_MAY_CHANGE, "--resume", "the run's") if args.resume else \
        (EVAL_ONLY_FLAGS, "--checkpoint", "the checkpoint's")
    if args.resume and not (Path(args.resume) / "args.json").is_file():
        fail(f"--resume {args.resume} is not a run folder of sgqn.py (no args.json); give the folder a run printed", 2)
    saved = read_checkpoint(Path(args.resume) / "checkpoint.pt" if args.resume else args.checkpoint, source)
    settings = Args(**{**saved["args"], "eval_modes": tuple(saved["args"]["eval_modes"])})
    if args.eval_only:  # an evaluation starts afresh: its folder, modes and data are its own
        settings = dataclasses.replace(settings, resume=None, **{name: getattr(Args(), name) for name in own})
    merged = tyro.cli(Args, args=argv, default=settings)
    for name in (f.name for f in dataclasses.fields(Args) if f.name not in own):
        if getattr(merged, name) != getattr(settings, name):
            fail(f"{flag(name)} {getattr(merged, name)} differs from {what} {getattr(settings, name)}; leave it out "
                 f"(only {' '.join(flag(n) for n in own)} may be given)", 2)
    if args.resume and saved["progress"]["step"] > merged.total_timesteps:
        fail(f"--total-timesteps {merged.total_timesteps} is below step {saved['progress']['step']}, which "
             f"{args.resume} has reached; give at least that", 2)
    if args.eval_only:
        print(f"evaluating with the checkpoint's settings: {merged.env_id}, action repeat {merged.action_repeat}, "
              f"frame stack {merged.frame_stack}, seed {merged.seed}, rho {merged.rho}")
    return merged, saved


def check_args(args):
    """Every flag, before anything is built: counts, ranges, relations, the task, paths (exit status 2)."""
    for f in dataclasses.fields(Args):
        value, low = getattr(args, f.name), LOWER_BOUNDS.get(f.name, 1)
        if f.type is int and value < low:
            fail(f"{flag(f.name)} must be at least {low}, got {value}", 2)
        if f.name in RANGES:  # (NaN is in no range)
            low, high, ends = RANGES[f.name]
            above_low = low < value or value == low and ends[0] == "["
            if not (above_low and (value < high or value == high and ends[1] == "]")):
                fail(f"{flag(f.name)} must be in {ends[0]}{low}, {high}{ends[1]}, got {value}", 2)
    held = min(args.learning_starts, args.buffer_size - args.frame_stack)  # transitions when updates start
    for broken, message in [
        (args.learning_starts >= args.total_timesteps and not args.eval_only, f"--learning-starts "
         f"{args.learning_starts} must be below --total-timesteps {args.total_timesteps}, or no update runs"),
        (args.batch_size > held and not args.eval_only, f"--batch-size {args.batch_size} is more than the {held} "
         "transitions the buffer holds when updates start; lower it or raise --learning-starts / --buffer-size"),
        (not args.eval_modes or bool(set(args.eval_modes) - set(envs.MODES)),
         f"--eval-modes {' '.join(args.eval_modes)}: choose one or more of {' '.join(envs.MODES)}"),
        (args.eval_only and not args.checkpoint, "--eval-only needs --checkpoint PATH (a checkpoint.pt a run wrote)"),
        (args.resume and (args.checkpoint or args.eval_only),
         "--resume continues a run from its own checkpoint; leave out --checkpoint and --eval-only"),
        (args.overlay_dir and not Path(args.overlay_dir).is_dir(),
         f"--overlay-dir {args.overlay_dir} is not a folder; give a folder of JPEG/PNG images or leave it out")]:
        if broken:
            fail(message, 2)
    try:
        envs.parse_env_id(args.env_id, envs.import_suite())
    except ValueError as e:
        fail(f"--env-id: {e}", 2)
    except OSError as e:  # no renderer
        fail(str(e))
    existing = next(p for p in [Path(args.output_dir), *Path(args.output_dir).parents] if p.exists() or p.is_symlink())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):  # (is_dir follows links: a dangling one)
        fail(f"--output-dir {args.output_dir}: {existing} is not a writable folder (or a dangling link); give one", 2)


def read_checkpoint(path, source="--checkpoint"):
    """A checkpoint this program wrote, or one line that says what is wrong with the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # no such file (a run stopped before its first checkpoint), not torch's, or a cut one
        fail(f"{source}: {path} is not a readable checkpoint ({' '.join(str(e).split())[:160]}); give a checkpoint.pt "
             "a run wrote", 2)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"{source}: {path} is not a checkpoint of this sgqn.py; give a checkpoint.pt a run wrote (an older one: "
             "use the sgqn.py that wrote it)", 2)
    return state


def load_agent(agent, state, path):
    """Networks, optimisers and temperature from a checkpoint; one line if it is another task's or other sizes'."""
    try:
        for name, value in vars(agent).items():
            value.data.copy_(state[name]) if name == "log_alpha" else value.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as e:
        sizes = ", ".join(f"{flag(n)} {state['args'][n]}" for n in ("env_id", "frame_stack", "num_filters",
                                                                    "projection_dim", "hidden_dim"))
        fail(f"{path} is a checkpoint of {sizes}, which does not fit this run's networks "
             f"({' '.join(str(e).split())[:120]}); give those flags or another checkpoint", 2)


def make_envs(args):
    """The training env and one env per evaluation mode, after checking every DMC-GB file they need."""
    try:
        envs.ensure_data(args.eval_modes, envs.resolve_data_dir(args.data_dir))
        make = functools.partial(envs.make_env, args.env_id, action_repeat=args.action_repeat,
                                 frame_stack=args.frame_stack, data_dir=args.data_dir)
        return make(args.seed, "train"), {mode: make(args.seed + 42, mode) for mode in args.eval_modes}
    except envs.DataError as e:
        fail(f"{e}; or give --data-dir, or train without the test scenes: --eval-modes train")
    except (ValueError, OSError) as e:  # a task without test scenes, a video without frames, no renderer
        fail(str(e))


def make_run_dir(args):
    """A new folder (a run never writes into another's); an --eval-only one is named after the run it evaluates."""
    algorithm = {(True, True): "sgsac", (True, False): "sac-consistency", (False, True): "sac-selfsup",
                 (False, False): "sac"}[args.consistency_coef > 0, args.aux_update_freq > 0]  # the paper's names
    name = f"eval__{Path(args.checkpoint).resolve().parent.name}" if args.eval_only else \
        f"{args.env_id}__{algorithm}{f'__rho{args.rho}' if algorithm != 'sac' else ''}__seed{args.seed}"
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}__{time.strftime('%Y%m%d-%H%M%S')}_", dir=args.output_dir))
    run_dir.chmod(0o755)  # mkdtemp makes it private
    return run_dir


def lock_run_dir(run_dir):
    """One process per run folder: a lock that lives as long as this process, however it ends. Keep it open."""
    lock = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"{run_dir} is in use by another process; wait for it to end or stop it, then resume")
    return lock


def atomic_write(path, data):
    """data (bytes) to path through a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Progress:
    """Where the run is, saved and restored as a whole."""
    step: int = 0  # agent steps taken
    updates_due: int = 0  # updates still owed for this step: the catch-up after the seed steps can be interrupted
    episode_return: float = 0.0
    done: bool = False  # the episode ended at this step and the env is not reset yet
    losses: dict = field(default_factory=dict)  # the last value of each loss (every-2-steps ones stay until renewed)


def save_replay(buffer, folder):
    """The entries added since the last save into folder's files, entry i of the run at offset i (append only)."""
    folder.mkdir(exist_ok=True)
    for name in ("frames", "actions", "rewards", "t"):  # the buffer's arrays
        array, path = getattr(buffer, name), folder / f"{name}.bin"
        with open(path, "r+b" if path.exists() else "wb") as f:
            for i in range(max(buffer.saved, buffer.added - buffer.capacity), buffer.added):
                f.seek(i * array[0].nbytes)
                f.write(array[i % buffer.capacity])
            f.flush()
            os.fsync(f.fileno())
    buffer.saved = buffer.added


def load_replay(buffer, folder, added):
    """The buffer as it was at `added` entries: the files are cut there, the last `capacity` go back to the ring."""
    first = max(0, added - buffer.capacity)
    for name in ("frames", "actions", "rewards", "t"):
        array, path = getattr(buffer, name), folder / f"{name}.bin"
        if path.stat().st_size < added * array[0].nbytes:
            raise OSError(f"{path} is shorter than its checkpoint says: its replay files were cut")
        os.truncate(path, added * array[0].nbytes)
        kept = np.memmap(path, array.dtype, "r", first * array[0].nbytes, (added - first, *array.shape[1:]))
        array[np.arange(first, added) % buffer.capacity] = kept
    buffer.added = buffer.saved = added
    buffer.next, buffer.size = added % buffer.capacity, min(added, buffer.capacity)


def save_checkpoint(run_dir, agent, buffer, env, eval_envs, rng, metrics, args, progress):
    """All that the run's future depends on, so that --resume continues it exactly: networks, optimisers, random states,
    envs, the replay buffer, the progress, the length of metrics.jsonl (later rows go on resume). -> the step saved."""
    save_replay(buffer, run_dir / "replay")
    os.fsync(metrics.fileno())  # (line-buffered: every row is written)
    state = {name: value.detach() if name == "log_alpha" else value.state_dict() for name, value in vars(agent).items()}
    state.update(format=CHECKPOINT_FORMAT, args=asdict(args), progress=asdict(progress), buffer_added=buffer.added,
                 metrics_bytes=metrics.tell(), torch_rng=torch.get_rng_state(),
                 numpy_rng=json.dumps(rng.bit_generator.state),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [], env=env.get_state(),
                 eval_envs={mode: eval_env.get_state() for mode, eval_env in eval_envs.items()})
    data = io.BytesIO()  # serialised in memory first: a full disk then fails in our write, with its errno
    torch.save(state, data)
    atomic_write(run_dir / "checkpoint.pt", data.getbuffer())
    return progress.step


def restore(saved, buffer, env, eval_envs, rng, run_dir):
    """Random states, envs, replay and metrics.jsonl as save_checkpoint left them. -> (progress, obs)."""
    try:
        torch.set_rng_state(saved["torch_rng"])
        torch.cuda.set_rng_state_all(saved["cuda_rng"])  # (none saved on a CPU)
        rng.bit_generator.state = json.loads(saved["numpy_rng"])
        for mode, eval_env in eval_envs.items():
            eval_env.set_state(saved["eval_envs"][mode])
        load_replay(buffer, run_dir / "replay", saved["buffer_added"])
        os.truncate(run_dir / "metrics.jsonl", saved["metrics_bytes"])
        return Progress(**saved["progress"]), env.set_state(saved["env"])
    except (OSError, KeyError, ValueError) as e:
        fail(f"--resume {run_dir}: its checkpoint does not fit its other files ({type(e).__name__}: {e}); "
             "start a new run")


class StopSignal:
    """Ctrl-C or a scheduler's SIGTERM: the first asks for a checkpoint and a stop at the next safe point (an
    evaluation, which a checkpoint precedes, stops after its episode); a second stops at once."""

    def __init__(self):
        self.signal = 0
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def finite_losses(losses, step, run_dir, saved_step):
    """The losses as floats (a host copy, made only when logging or checkpointing); stop if one is NaN or inf."""
    values = {name: float(value) for name, value in losses.items()}
    for name in (name for name, value in values.items() if not math.isfinite(value)):
        kept = f"the last good checkpoint (step {saved_step}) is in {run_dir}" if saved_step else "no checkpoint yet"
        fail(f"loss {name} is {values[name]} at step {step}: training diverged; {kept}")
    return values


def saliency_picture(agent, obs, rho):
    """The newest frame of obs (9, 84, 84) uint8 | its guided-backprop map | saliency mask | predicted mask."""
    x = torch.as_tensor(obs, device=agent.log_alpha.device).float()[None]
    with torch.no_grad():
        features = agent.critic.encoder(x)
        action = agent.actor(features)[0]
        predicted = torch.sigmoid(agent.decoder(agent.critic.projection(features), action))[0, -3:].mean(0)
    attribution = guided_backprop(agent.critic, x, action)
    gradients = attribution[0, -3:].abs().amax(0)  # (84, 84)
    maps = [gradients / gradients.max().clamp(min=1e-12), saliency_mask(attribution, rho)[0, -1], predicted]
    grey = [np.repeat((m.cpu().numpy()[..., None] * 255).astype(np.uint8), 3, 2) for m in maps]
    return np.concatenate([obs[-3:].transpose(1, 2, 0), *grey], 1)  # (84, 4 * 84, 3)


def run_evaluation(step, final, eval_envs, agent, args, run_dir, metrics, stop):
    """Every eval mode: a line and a metrics.jsonl row each, at the end of a run a saliency picture. -> results, s."""
    start, results = time.time(), {}
    episodes = args.final_eval_episodes if final else args.eval_episodes
    for mode, eval_env in eval_envs.items():
        frames, returns = [], []
        for episode_return in evaluate(eval_env, agent.critic.encoder, agent.actor, episodes, agent.log_alpha.device,
                                       frames):
            returns.append(episode_return)
            if stop.signal:  # a checkpoint precedes every evaluation: nothing to save
                raise KeyboardInterrupt
        results[mode] = dict(mean=float(np.mean(returns)), std=float(np.std(returns)), episodes=len(returns))
        metrics.write(json.dumps(dict(step=step, mode=mode, eval_return=results[mode]["mean"],
                                      eval_std=results[mode]["std"], episodes=len(returns))) + "\n")
        print(f"evaluation at step {step}: {mode} {results[mode]['mean']:.1f} ± {results[mode]['std']:.1f} "
              f"({episodes} episode{'s' * (episodes > 1)}, {time.time() - start:.0f} s)", flush=True)
        if final:  # a frame into the first episode
            picture = saliency_picture(agent, frames[min(15, len(frames) - 1)], args.rho)
            iio.imwrite(run_dir / f"saliency_{mode}.png", picture.repeat(2, 0).repeat(2, 1))
    metrics.write(json.dumps(dict(step=step, eval_seconds=(seconds := time.time() - start))) + "\n")
    return results, seconds


# ---------------------------------------------------------------- main
def main(args, saved=None):
    """Train and evaluate as args say, or evaluate a checkpoint (saved: the one parse_args read). -> the run folder."""
    check_args(args)
    saved = saved or (read_checkpoint(args.checkpoint) if args.checkpoint else None)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    env, eval_envs = make_envs(args)
    obs_shape, action_dim = env.observation_shape, env.action_shape[0]
    agent = make_agent(obs_shape, action_dim, args, device)
    if saved:
        load_agent(agent, saved, args.checkpoint or args.resume)
    try:  # the overlay augmentation's images, on the device once (an evaluation needs none)
        overlay = None if args.eval_only else \
            envs.overlay_images(args.overlay_dir, args.overlay_images, obs_shape[-1], args.seed).to(device)
    except ValueError as e:  # an unreadable --overlay-dir
        fail(str(e), 2)
    buffer = ReplayBuffer(args.buffer_size, (3, *obs_shape[1:]), action_dim, args.frame_stack)
    run_dir = Path(args.resume) if args.resume else make_run_dir(args)  # everything is checked: the run starts
    lock = lock_run_dir(run_dir)
    if args.resume:
        progress, obs = restore(saved, buffer, env, eval_envs, rng, run_dir)
    else:
        progress, (obs, _) = Progress(step=saved["progress"]["step"] if args.eval_only else 0), env.reset()
        buffer.add(obs[-3:], first=True)
    stop, saved_step, results = StopSignal(), progress.step if args.resume else None, {}
    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: each row reaches the file
    print(f"run folder: {run_dir}  step {progress.step} of {args.total_timesteps}  device: {device}")
    start_time, first_step, eval_seconds = time.time(), progress.step, 0.0
    try:
        if not args.eval_only:  # (a resumed run's --total-timesteps may extend it)
            atomic_write(run_dir / "args.json", json.dumps(asdict(args), indent=2).encode())
        while True:
            eval_due = progress.step % args.eval_freq == 0 or progress.step == args.total_timesteps  # step 0: as DMC-GB
            if not progress.updates_due:  # (a run stopped amid the catch-up finishes its updates first)
                if eval_due or args.eval_only:
                    final = progress.step == args.total_timesteps or args.eval_only
                    results, seconds = run_evaluation(progress.step, final, eval_envs, agent, args, run_dir, metrics,
                                                      stop)
                    eval_seconds += seconds
                if progress.step == args.total_timesteps or args.eval_only:
                    break
                progress.step += 1  # act, step the env, store
                if progress.step <= args.learning_starts:
                    action = rng.uniform(env.action_low, env.action_high).astype(np.float32)
                else:
                    action = act(agent.critic.encoder, agent.actor, obs, device, deterministic=False)
                obs, reward, terminated, truncated, _ = env.step(action)
                buffer.add(obs[-3:], action, reward)
                progress.episode_return, progress.done = progress.episode_return + reward, terminated or truncated
                # no update during the seed steps, as many as seed steps at the last of them, then one per step
                progress.updates_due = progress.step if progress.step == args.learning_starts else \
                    int(progress.step > args.learning_starts)
                if progress.step == args.learning_starts:  # (the catch-up takes minutes)
                    print(f"step {progress.step}: seed steps done, {progress.step} catch-up updates", flush=True)
                eval_due = progress.step % args.eval_freq == 0 or progress.step == args.total_timesteps
            while progress.updates_due and not stop.signal:  # update
                b_obs, b_action, b_reward, b_next_obs = buffer.sample(args.batch_size, rng)
                batch = (random_shift(torch.as_tensor(b_obs, device=device), args.shift_pad).float(),  # (B, 9, 84, 84)
                         torch.as_tensor(b_action, device=device),  # (B, A)
                         torch.as_tensor(b_reward, device=device)[:, None],  # (B, 1)
                         random_shift(torch.as_tensor(b_next_obs, device=device), args.shift_pad).float())  # own shift
                progress.losses.update(update(agent, batch, progress.step, args, overlay))
                progress.updates_due -= 1
            if not progress.updates_due and (progress.done or eval_due):  # log
                elapsed = time.time() - start_time
                row = dict(step=progress.step, frames=progress.step * args.action_repeat, elapsed_hours=elapsed / 3600,
                           sps=(progress.step - first_step) / max(elapsed - eval_seconds, 1e-9),  # training only
                           **finite_losses(progress.losses, progress.step, run_dir, saved_step))
                if progress.done:  # reset
                    row["episodic_return"] = progress.episode_return
                    obs, _ = env.reset()
                    buffer.add(obs[-3:], first=True)
                    progress.episode_return, progress.done = 0.0, False
                metrics.write(json.dumps(row) + "\n")
                print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if stop.signal or eval_due or progress.step % args.checkpoint_freq == 0:  # checkpoint
                finite_losses(progress.losses, progress.step, run_dir, saved_step)
                saved_step = save_checkpoint(run_dir, agent, buffer, env, eval_envs, rng, metrics, args, progress)
            if stop.signal:
                raise KeyboardInterrupt
    except (KeyboardInterrupt, Exception) as e:  # a real bug prints its traceback, then where the outputs are
        hint = f"the last good checkpoint is step {saved_step}; resume with: python sgqn.py --resume {run_dir}" \
            if saved_step is not None else f"no checkpoint was written; its outputs are in {run_dir}"
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted; the evaluation's outputs so far are in {run_dir}" if args.eval_only else
                  f"interrupted; {hint}", file=sys.stderr)
            raise SystemExit(128 + (stop.signal or signal.SIGINT)) from None
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # a full disk, a quota...: one line
            fail(f"writing {e.filename or 'in ' + str(run_dir)} failed: {e.strerror}; fix the cause; {hint}")
        traceback.print_exc()
        fail(f"the run stopped after step {progress.step} (traceback above); {hint}")
    finally:
        metrics.close()
        lock.close()
        stop.restore()
    results = dict(step=progress.step, results=results, checkpoint=args.checkpoint)  # (the evaluated or initial one)
    atomic_write(run_dir / "results.json", json.dumps(results, indent=2).encode())
    print(f"results written to {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
