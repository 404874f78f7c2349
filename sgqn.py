"""SG-SAC: Soft Actor-Critic from pixels with saliency-guided Q-networks (SGQN).

Bertoin, Zouitine, Zouitine, Rachelson. "Look where you look! Saliency-guided Q-networks for
generalization in visual reinforcement learning", NeurIPS 2022.

SAC learns from 84x84 pixels on the plain DeepMind Control scene; SGQN makes the critic look at the
right pixels, so that the agent generalises zero-shot to the DMControl Generalization Benchmark scenes
(color_easy, color_hard, video_easy, video_hard). From the critic's own saliency:
  1. attribution: guided backpropagation of Q1 with respect to the observation; the saliency mask
     keeps, per frame, the pixels whose attribution is at or above the rho-quantile;
it builds two losses:
  2. consistency: Q on the full observation and Q on the masked observation should agree
     (added to the critic loss with weight `consistency_coef`);
  3. self-supervision: an attribution decoder on top of the critic's encoder predicts the mask from
     an overlay-augmented observation (binary cross-entropy, every `aux_update_freq` steps).

Usage:
    python sgqn.py --env-id cartpole --rho 0.98          # train, evaluate on every DMC-GB mode
    python sgqn.py --env-id walker-stand --rho 0.95 --consistency-coef 0 --aux-update-freq 0  # plain SAC
    python sgqn.py --resume runs/<run>                   # continue an interrupted run exactly (Ctrl-C saves)
    python sgqn.py --checkpoint runs/<run>/checkpoint.pt --eval-only   # with the checkpoint's own settings
    python sgqn.py --help

Where we differ from the authors' code (SuReLI/SGQN, DMC/), on purpose:
  - Guided backprop runs once per step, on the critic's own forward of obs before the critic step; its
    mask serves both the consistency term and the auxiliary target (the authors run it twice, before and
    after the critic step). The actor step reuses that forward's detached conv features instead of
    encoding obs again. Both save encoder passes; the aux target and the actor's features come from
    weights one critic step older.
  - Same results, computed faster: the mask threshold from one topk instead of torch.quantile's sort;
    the decoder's upsample-then-conv as one transposed conv (`upsample_conv`).
  - Overlay images come from a pool loaded once onto the device (random flips per draw) instead of a
    Places365 DataLoader with RandomResizedCrop; without --overlay-dir a procedural generator of
    1/f-spectrum images stands in for Places365 (see README).
  - The replay buffer stores each rendered frame once and rebuilds stacks by index (about 11 GB for
    500k transitions instead of 60+ GB); the sampled batches are the same.
  - Periodic evaluation uses `eval_episodes` (10) episodes per mode; the final evaluation uses
    `final_eval_episodes` (100), as DMC-GB's published protocol (the authors use 30 throughout).
  - Adam is fused (one kernel per parameter group): same algorithm, other float rounding.
  - A run checkpoints everything it depends on and --resume continues it bit for bit; the authors' code cannot.
"""

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import io
import itertools
import json
import math
import os
import shutil
import signal
import socket
import sys
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


@dataclass
class Args:
    env_id: str = "cartpole"
    """a domain for its default task (cartpole, walker, finger, ball_in_cup, cheetah, reacher), or domain-task"""
    rho: float = 0.98
    """saliency quantile: the mask keeps pixels at or above it (0.98 cartpole/ball_in_cup, 0.95 walker/finger)"""
    seed: int = 1
    """seed of the agent and the training env (test envs use seed + 42, as DMC-GB)"""
    total_timesteps: int = 500_000
    """agent steps to train for (simulator frames = agent steps * action_repeat)"""
    action_repeat: int = 4
    """simulator steps per agent step (4 in the paper's main tables; 8 cartpole, 2 finger in its appendix)"""
    frame_stack: int = 3
    """consecutive RGB frames per observation"""
    buffer_size: int = 500_000
    """replay capacity, in frames (one frame per transition)"""
    batch_size: int = 128
    """transitions per gradient update"""
    gamma: float = 0.99
    """discount factor"""
    learning_starts: int = 1000
    """random-action seed steps; at this step as many updates as seed steps are run (authors' code)"""
    actor_lr: float = 1e-3
    """actor Adam learning rate (betas 0.9, 0.999)"""
    critic_lr: float = 1e-3
    """critic Adam learning rate (betas 0.9, 0.999)"""
    alpha_lr: float = 1e-4
    """temperature Adam learning rate (betas 0.5, 0.999)"""
    init_temperature: float = 0.1
    """initial entropy temperature alpha"""
    aux_lr: float = 3e-4
    """learning rate of the attribution predictor's Adam (decoder and shared encoder)"""
    critic_tau: float = 0.01
    """Polyak rate of the target Q heads"""
    encoder_tau: float = 0.05
    """Polyak rate of the target encoder (conv stack and critic projection)"""
    actor_update_freq: int = 2
    """actor, temperature and target updates every this many steps"""
    consistency_coef: float = 0.5
    """weight lambda of the consistency loss Q(s) vs Q(masked s); 0 turns it off"""
    aux_update_freq: int = 2
    """self-supervised attribution-prediction step every this many steps; 0 turns it off"""
    shift_pad: int = 4
    """random-shift augmentation padding (replicate), on obs and next_obs"""
    overlay_alpha: float = 0.5
    """overlay augmentation: (1 - alpha) * obs + alpha * image, for the auxiliary input"""
    overlay_dir: str | None = None
    """folder of JPEG/PNG images to overlay (Places365 reproduces the paper); none: procedural images"""
    overlay_images: int = 10_000
    """overlay images kept on the device (loaded once)"""
    num_filters: int = 32
    """filters per conv layer"""
    projection_dim: int = 100
    """size of the actor's and critic's projections"""
    hidden_dim: int = 1024
    """hidden units of the actor and Q heads"""
    log_std_min: float = -10.0
    """actor log-std lower bound"""
    log_std_max: float = 2.0
    """actor log-std upper bound"""
    eval_freq: int = 10_000
    """evaluate every this many agent steps (and at step 0)"""
    eval_episodes: int = 10
    """episodes per mode in the periodic evaluations"""
    final_eval_episodes: int = 100
    """episodes per mode in the final evaluation (DMC-GB protocol)"""
    eval_modes: tuple[str, ...] = envs.MODES
    """scenes to evaluate on"""
    data_dir: str | None = None
    """DMC-GB data folder (default: $DMCGB_DATA_DIR, then a per-user cache; downloaded if missing)"""
    output_dir: str = "runs"
    """parent folder of the run folder"""
    cuda: bool = True
    """use CUDA when available"""
    capture_video: bool = False
    """save an MP4 of one evaluation episode per mode beside the predicted saliency"""
    checkpoint_freq: int = 5000
    """save a checkpoint every this many agent steps (and before every evaluation and on Ctrl-C)"""
    resume: str | None = None
    """continue the run in this folder from its latest checkpoint, exactly (--total-timesteps may extend it)"""
    checkpoint: str | None = None
    """checkpoint to load (with --eval-only: evaluate it with its own settings; otherwise it initialises the agent)"""
    eval_only: bool = False
    """only evaluate --checkpoint on every eval mode with final_eval_episodes episodes"""


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


def procedural_images(n, size, generator):
    """Images whose amplitude spectrum falls as 1/f, like natural photographs, with random colours.
    A stand-in for Places365 when no image folder is given. Returns (n, 3, size, size) uint8."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    inv_f = 1 / torch.sqrt(fx**2 + fy**2).clamp(min=1 / size)
    chunks = []
    for start in range(0, n, 512):  # bounded memory
        m = min(512, n - start)
        noise = torch.randn(m, 3, size, size // 2 + 1, 2, generator=generator)
        img = torch.fft.irfft2(torch.view_as_complex(noise) * inv_f, s=(size, size))
        img = torch.einsum("nij,njhw->nihw", torch.rand(m, 3, 3, generator=generator), img)  # colours
        lo, hi = img.amin((1, 2, 3), keepdim=True), img.amax((1, 2, 3), keepdim=True)
        chunks.append(((img - lo) / (hi - lo) * 255).to(torch.uint8))
    return torch.cat(chunks)


def load_images(folder, n, size, rng):
    """Up to n JPEG/PNG images from folder (recursively), centre-cropped and resized: (n, 3, size, size) uint8."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise ValueError(f"no JPEG/PNG images in --overlay-dir {folder}; give an image folder or leave it out")
    images = []
    for i in rng.permutation(len(paths))[:n]:
        try:
            pixels = np.atleast_3d(iio.imread(paths[i]))
        except Exception as e:  # truncated or not an image: imageio's message would blame its plugins
            raise ValueError(f"--overlay-dir: cannot read image {paths[i]} ({type(e).__name__}); remove it or "
                             "give another folder") from None
        pixels = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]  # RGB(A) or grey(+alpha)
        img = torch.from_numpy(pixels.copy()).permute(2, 0, 1).expand(3, -1, -1).float()
        side = min(img.shape[1:])
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        img = img[None, :, top : top + side, left : left + side]
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255))
    return torch.cat(images).to(torch.uint8)


# ---------------------------------------------------------------- saliency
@contextlib.contextmanager
def guided_relus(critic):
    """Guided backpropagation: while active, each forward through one of the critic's nn.ReLU modules hooks
    its output so that the gradient arriving there is clamped at 0; the ReLU then passes back max(grad, 0)
    where its input was positive, as captum's GuidedBackprop (the authors' tool). On exit every hook is
    removed, so a later backward through the same graph (the critic loss) gets ordinary gradients."""
    gradient_hooks = []

    def hook_output(module, inputs, output):
        gradient_hooks.append(output.register_hook(lambda grad: grad.clamp(min=0)))

    forward_hooks = [m.register_forward_hook(hook_output) for m in critic.modules() if isinstance(m, nn.ReLU)]
    try:
        yield
    finally:
        for hook in forward_hooks + gradient_hooks:
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
    """Per sample and frame: 1 where max over RGB of |attribution| >= its rho-quantile over the frame's
    pixels, repeated over the frame's 3 channels. (B, 3k, H, W) -> (B, 3k, H, W) float 0/1.
    Exactly the authors' `m >= torch.quantile(m, rho)` for NaN-free maps, because the threshold is computed as
    torch.quantile does: rank rho * (n - 1) in the input's dtype, the order statistics at floor and ceil of the
    rank, torch.lerp between them with weight rank - floor. Those two values come from one topk of the top
    n - floor values (about 2% at rho 0.98), 7x faster than torch.quantile's full sort."""
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

    def __init__(self, features_dim, action_dim, projection_dim, hidden_dim, log_std_min, log_std_max):
        super().__init__()
        self.projection = projection(features_dim, projection_dim)
        self.trunk = mlp(projection_dim, hidden_dim, 2 * action_dim)
        self.apply(weight_init)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, features):
        """-> tanh(mean) (B, A), sampled action (B, A), its log-probability (B, 1)."""
        mean, log_std = self.trunk(self.projection(features)).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        noise = torch.randn_like(mean)
        pi = mean + noise * log_std.exp()
        log_prob = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True) - 0.5 * math.log(2 * math.pi) * noise.shape[-1]
        pi = torch.tanh(pi)
        log_prob -= torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)  # tanh change of variables
        return torch.tanh(mean), pi, log_prob


def upsample_conv(x, conv):
    """conv(nearest_upsample_x2(x)) for a 3x3 conv with padding 1, as one stride-2 transposed conv with a 4x4
    kernel. Along each axis, output 2r sees x[r-1] through conv tap 0 and x[r] through taps 1 + 2; output 2r+1
    sees x[r] through taps 0 + 1 and x[r+1] through tap 2. Same parameters and result (up to float rounding),
    2.25x fewer multiply-adds than convolving the upsampled map. x: (B, I, H, W) -> (B, O, 2H, 2W)."""
    # fold[a, k]: the conv taps k summed into transposed tap a, which carries x[i] to output 2i + a - 1
    fold = x.new_tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    kernel = torch.einsum("ak,oikl,bl->ioab", fold, conv.weight, fold)  # (I, O, 4, 4)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


class AttributionDecoder(nn.Module):
    """Predicts saliency-mask logits (B, 9, 84, 84) from [critic projection, action]: linear to the encoder's
    (32, 21, 21), conv 128, upsample x2, conv 64, upsample x2, conv 9 (ReLU between). Default PyTorch init,
    as in the authors' code."""

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
    """Stores every rendered frame once, as uint8, in a ring; observation stacks are rebuilt by index.
    Slot j holds frame t of an episode (t = 0 at reset) and, for t >= 1, the action and reward that led
    to it: the transition (stack(t-1), a, r, stack(t)), where stack(t) = frames max(t-k+1, 0)..t."""

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
    """Yields the return of each of `episodes` episodes of the mean action; with frames_out (a list), the first
    episode's observations are appended to it."""
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
    actor = Actor(encoder.out_dim, action_dim, args.projection_dim, args.hidden_dim, args.log_std_min,
                  args.log_std_max).to(device)
    decoder = AttributionDecoder(encoder.out_shape, obs_shape, action_dim, args.projection_dim).to(device)
    log_alpha = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    # the attribution predictor is the critic's encoder and projection + the decoder: its step trains them all
    aux_parameters = [*encoder.parameters(), *critic.projection.parameters(), *decoder.parameters()]
    # fused: one kernel per parameter group instead of about ten per parameter (a GPU's launch budget); the meta
    # device, the tests' stand-in for CUDA, has no fused kernel
    adam = functools.partial(torch.optim.Adam, fused=device.type != "meta")
    return Agent(
        critic=critic,
        critic_target=copy.deepcopy(critic),  # with its own copy of the encoder
        actor=actor,
        decoder=decoder,
        log_alpha=log_alpha,
        critic_optimizer=adam(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.999)),
        actor_optimizer=adam(actor.parameters(), lr=args.actor_lr, betas=(0.9, 0.999)),
        alpha_optimizer=adam([log_alpha], lr=args.alpha_lr, betas=(0.5, 0.999)),
        aux_optimizer=adam(aux_parameters, lr=args.aux_lr, betas=(0.9, 0.999)),
    )


def update(agent, batch, step, args, overlay):
    """One SG-SAC gradient step on an augmented batch; returns its losses (tensors).
    Encoder passes (B samples each): forward of obs, shared by the critic loss and guided backprop, and one
    backward to the input for the attribution; forward of the masked obs; backward of both for the critic loss;
    two forwards without gradient for the TD target (online encoder for the actor, target encoder); every
    `aux_update_freq` steps a forward and backward of the overlaid obs. The actor reuses the critic's conv
    features. That is 4 forwards (5 on aux steps) and 1 guided backward per step; the authors' code makes
    6 forwards on odd steps and 9 on even ones (actor, aux), and 2 guided backwards."""
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
# Everything below runs the method: settings and their checks, the run folder, checkpoints and exact resume, signals,
# progress lines and the training loop. A copy of SG-SAC into another code base needs none of it.
CHECKPOINT_FORMAT = "sgqn.py checkpoint 2"
# flags that --resume may change (the rest is what the run is), and those --eval-only takes from its command line
RESUME_MAY_CHANGE = ("resume", "total_timesteps", "data_dir", "output_dir", "cuda", "capture_video")
EVAL_ONLY_FLAGS = ("checkpoint", "eval_only", "eval_modes", "final_eval_episodes", "data_dir", "output_dir", "cuda",
                   "capture_video")
LOWER_BOUNDS = {"aux_update_freq": 0, "shift_pad": 0, "seed": 0}  # every other integer flag counts something: >= 1
RANGES = {  # float flags: (low, high, which ends are allowed)
    "rho": (0, 1, "()"), "gamma": (0, 1, "(]"), "critic_tau": (0, 1, "[]"), "encoder_tau": (0, 1, "[]"),
    "overlay_alpha": (0, 1, "[]"), "init_temperature": (0, math.inf, "()"), "consistency_coef": (0, math.inf, "[)"),
    "actor_lr": (0, math.inf, "[)"), "critic_lr": (0, math.inf, "[)"), "alpha_lr": (0, math.inf, "[)"),
    "aux_lr": (0, math.inf, "[)"),
}


def fail(message, status=1):
    """Stop with one line `error: ...` and no traceback: status 2 for a bad argument (argparse's), 1 otherwise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv):
    """-> (args, checkpoint or None). With --resume or --eval-only the checkpoint is read once and its settings are
    the run's; only the flags of RESUME_MAY_CHANGE / EVAL_ONLY_FLAGS may be given on top."""
    args = tyro.cli(Args, args=argv)
    if not (args.resume or args.eval_only and args.checkpoint):
        return args, None
    source, what = ("--resume", "the run's") if args.resume else ("--checkpoint", "the checkpoint's")
    if args.resume and not (Path(args.resume) / "args.json").is_file():
        fail(f"--resume {args.resume} is not a run folder of sgqn.py (no args.json); give the folder a run printed", 2)
    saved = read_checkpoint(Path(args.resume) / "checkpoint.pt" if args.resume else args.checkpoint, source)
    own = RESUME_MAY_CHANGE if args.resume else EVAL_ONLY_FLAGS
    settings = args_from(saved, source)  # a resumed run keeps its data dir, output dir...; an evaluation starts afresh
    if args.eval_only:
        settings = dataclasses.replace(settings, resume=None, **{name: getattr(Args(), name) for name in own})
    merged = tyro.cli(Args, args=argv, default=settings)
    for name in (f.name for f in dataclasses.fields(Args) if f.name not in own):
        if getattr(merged, name) != getattr(settings, name):
            fail(f"{flag(name)} {getattr(merged, name)} differs from {what} {getattr(settings, name)}; "
                          f"leave it out (only {' '.join(flag(n) for n in own)} may be given)", 2)
    if args.resume and saved["progress"]["step"] > merged.total_timesteps:
        fail(f"--total-timesteps {merged.total_timesteps} is below step {saved['progress']['step']}, which "
             f"{args.resume} has reached; give at least that", 2)
    if args.eval_only:
        print(f"evaluating with the checkpoint's settings: {merged.env_id}, action repeat {merged.action_repeat}, "
              f"frame stack {merged.frame_stack}, seed {merged.seed}, rho {merged.rho}")
    return merged, saved


def args_from(saved, source):
    try:
        return Args(**{**saved["args"], "eval_modes": tuple(saved["args"]["eval_modes"])})
    except (TypeError, KeyError) as e:
        fail(f"{source}: the checkpoint was written by another version of sgqn.py ({e})")


def check_args(args):
    """Every flag, before anything is built: counts and frequencies, ranges, relations, sizes, paths (status 2)."""
    for f in dataclasses.fields(Args):
        value, low = getattr(args, f.name), LOWER_BOUNDS.get(f.name, 1)
        if f.type is int and value < low:
            fail(f"{flag(f.name)} must be at least {low}, got {value}", 2)
        if f.type is float and not math.isfinite(value) and f.name not in RANGES:
            fail(f"{flag(f.name)} must be a finite number, got {value}", 2)
        if f.name in RANGES:
            low, high, ends = RANGES[f.name]
            inside = (low < value or ends[0] == "[" and value == low) and \
                (value < high or ends[1] == "]" and value == high)
            if not inside:
                fail(f"{flag(f.name)} must be in {ends[0]}{low}, {high}{ends[1]}, got {value}", 2)
    held = min(args.learning_starts, args.buffer_size - args.frame_stack)  # transitions when updates start
    problems = [  # (broken, message)
        (args.log_std_min >= args.log_std_max,
         f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}"),
        (args.learning_starts >= args.total_timesteps and not args.eval_only, f"--learning-starts "
         f"{args.learning_starts} must be below --total-timesteps {args.total_timesteps}, or no update runs"),
        (args.batch_size > held and not args.eval_only, f"--batch-size {args.batch_size} is more than the {held} "
         "transitions the buffer holds when updates start; lower it or raise --learning-starts / --buffer-size"),
        (args.seed + 42 >= 2**32, f"--seed must be below {2**32 - 42} (test scenes use seed + 42, a 32-bit seed)"),
        (not args.eval_modes or bool(set(args.eval_modes) - set(envs.MODES)),
         f"--eval-modes {' '.join(args.eval_modes)}: choose one or more of {' '.join(envs.MODES)}"),
        (args.eval_only and not args.checkpoint, "--eval-only needs --checkpoint PATH (a checkpoint.pt a run wrote)"),
        (args.resume and (args.checkpoint or args.eval_only),
         "--resume continues a run from its own checkpoint; leave out --checkpoint and --eval-only"),
        (args.overlay_dir and not Path(args.overlay_dir).is_dir(),
         f"--overlay-dir {args.overlay_dir} is not a folder; give a folder of JPEG/PNG images or leave it out"),
    ]
    for broken, message in problems:
        if broken:
            fail(message, 2)
    try:
        envs.parse_env_id(args.env_id, envs.import_suite())
    except ValueError as e:
        fail(f"--env-id: {e}", 2)
    except OSError as e:  # no renderer
        fail(str(e))
    existing = next(p for p in [Path(args.output_dir), *Path(args.output_dir).parents] if p.exists() or p.is_symlink())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a dangling link" if existing.is_symlink() else "not writable" if existing.is_dir() else "not a folder"
        fail(f"--output-dir {args.output_dir}: {existing} is {what}; give a writable folder "
             "(it is created if missing)", 2)


def read_checkpoint(path, source="--checkpoint"):
    """A checkpoint this program wrote, or one line that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fix = "the run stopped before its first checkpoint: start it again" if source == "--resume" else \
            "give a checkpoint.pt that a run wrote"
        fail(f"{source}: {path} is not a file; {fix}", 2)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            fail(f"{source}: {path} is not a checkpoint of sgqn.py (not a file torch.save wrote); give a "
                          "checkpoint.pt that a run wrote", 2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{source}: {path} is truncated or corrupt ({' '.join(str(e).split())[:160]}); use another copy, "
             "or the run folder's checkpoint.pt with --resume")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"{source}: {path} is a torch file but not a checkpoint of this sgqn.py; give a checkpoint.pt "
             "that a run wrote", 2)
    return state


def load_agent(agent, state, path):
    """Networks, optimisers and temperature from a checkpoint; one line if it is another task's or other sizes'."""
    try:
        for name, value in vars(agent).items():
            value.data.copy_(state[name]) if name == "log_alpha" else value.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as e:
        trained = args_from(state, path)
        sizes = ", ".join(f"{flag(n)} {getattr(trained, n)}" for n in ("env_id", "frame_stack", "num_filters",
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


def algorithm(args):
    """SG-SAC or the ablation that the two switches select (the paper's names)."""
    return {(True, True): "sgsac", (True, False): "sac-consistency", (False, True): "sac-selfsup",
            (False, False): "sac"}[args.consistency_coef > 0, args.aux_update_freq > 0]


def make_run_dir(args):
    """A new folder for this run's outputs: a run never writes into another's. An --eval-only folder is named after
    the run it evaluates (eval__<run folder>__step<N>), so no glob for training runs picks it."""
    if args.eval_only:
        name = f"eval__{Path(args.checkpoint).resolve().parent.name}"
    else:
        rho = f"__rho{args.rho}" if algorithm(args) != "sac" else ""  # only saliency uses it
        name = f"{args.env_id}__{algorithm(args)}{rho}__seed{args.seed}"
    name = f"{name}__{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in itertools.count():
        run_dir = Path(args.output_dir) / (f"{name}-{suffix}" if suffix else name)
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            if not run_dir.is_dir():
                raise


def lock_run_dir(run_dir):
    """One process per run folder: an exclusive lock on run_dir/.lock for the life of the process (the kernel drops
    it when the process dies, however it dies). -> the open lock file (keep it open)."""
    lock = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = (lock.read().strip().splitlines() or ["unknown"])[-1]
        fail(f"{run_dir} is in use by another process ({holder}); wait for it to end or stop it, then resume")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def atomic_write(path, data):
    """data (bytes) into a temporary file of path's folder, renamed over path: a kill at any instant leaves the old file
    or the new one, whole; a failed write leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = e.filename or str(path)  # a failed write names no file by itself
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def write_json(path, value):
    atomic_write(path, json.dumps(value, indent=2).encode())


@dataclass
class Progress:
    """Where the run is, saved and restored as a whole."""
    step: int = 0  # agent steps taken
    updates_due: int = 0  # updates still owed for this step: the catch-up after the seed steps can be interrupted
    episode_return: float = 0.0
    done: bool = False  # the episode ended at this step and the env is not reset yet
    losses: dict = field(default_factory=dict)  # the last value of each loss (every-2-steps ones stay until renewed)
    results: dict = field(default_factory=dict)  # the last evaluation


def ring_pieces(capacity, start, stop):
    """Entries start..stop-1 of the run as contiguous slices of a ring of `capacity`: (run index, slot, count)."""
    while start < stop:
        count = min(stop - start, capacity - start % capacity)
        yield start, start % capacity, count
        start += count


def save_replay(buffer, folder):
    """For --resume: the frames added since the last save go to folder's files, entry i of the run at offset i (so a
    checkpoint never rewrites what is on disk); frames evicted before a save are holes, never read again."""
    folder.mkdir(exist_ok=True)
    for name in ("frames", "actions", "rewards", "t"):
        array, path = getattr(buffer, name), folder / f"{name}.bin"
        try:
            with open(path, "r+b" if path.exists() else "wb") as f:
                unsaved = max(buffer.saved, buffer.added - buffer.capacity)  # evicted frames are never saved
                for start, slot, count in ring_pieces(buffer.capacity, unsaved, buffer.added):
                    f.seek(start * array[0].nbytes)
                    f.write(array[slot : slot + count].data.cast("B"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            e.filename = e.filename or str(path)  # a failed write names no file by itself
            raise
    buffer.saved = buffer.added


def load_replay(buffer, folder, added):
    """For --resume: the buffer as it was when `added` frames had been saved; what was written after that checkpoint
    is cut off the files, and the last `capacity` frames go back to their ring slots."""
    for name in ("frames", "actions", "rewards", "t"):
        array = getattr(buffer, name)
        with open(folder / f"{name}.bin", "r+b") as f:
            if os.fstat(f.fileno()).st_size < added * array[0].nbytes:
                raise OSError(f"{f.name} is shorter than its checkpoint says: its replay files were cut")
            f.truncate(added * array[0].nbytes)
            for start, slot, count in ring_pieces(buffer.capacity, max(0, added - buffer.capacity), added):
                f.seek(start * array[0].nbytes)
                f.readinto(array[slot : slot + count].data.cast("B"))
    buffer.added = buffer.saved = added
    buffer.next, buffer.size = added % buffer.capacity, min(added, buffer.capacity)


def save_checkpoint(run_dir, agent, buffer, env, eval_envs, rng, metrics, args, progress):
    """All that the run's future depends on, so that --resume continues it exactly: networks, optimisers, random
    states, environments, the replay buffer (its new frames appended to run_dir/replay first), the progress and the
    length of metrics.jsonl (rows written after this are dropped on resume)."""
    save_replay(buffer, run_dir / "replay")
    metrics.flush()
    os.fsync(metrics.fileno())
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
    """A resumed run's random states, environments, replay buffer and metrics.jsonl as save_checkpoint left them.
    -> (progress, obs)."""
    try:
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        rng.bit_generator.state = json.loads(saved["numpy_rng"])
        for mode, eval_env in eval_envs.items():
            eval_env.set_state(saved["eval_envs"][mode])
        load_replay(buffer, run_dir / "replay", saved["buffer_added"])
        with open(run_dir / "metrics.jsonl", "r+b") as f:
            f.truncate(saved["metrics_bytes"])
        return Progress(**saved["progress"]), env.set_state(saved["env"])
    except (OSError, KeyError, ValueError) as e:
        fail(f"--resume {run_dir}: its checkpoint does not fit its other files ({type(e).__name__}: {e}); "
             "start a new run")


class StopSignal:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM: the first asks the run to stop at its next safe point (the loop saves
    a checkpoint first; an evaluation, which a checkpoint precedes, stops after its episode); a second stops at once."""

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


class Pacer:
    """Progress lines of a long phase: one every 30 s or every tenth of the work, whichever comes first."""

    def __init__(self, what, total):
        self.what, self.total, self.done, self.start = what, total, 0, time.time()
        self.last = self.start

    def tick(self, note=""):
        self.done += 1
        now = time.time()
        if now - self.last >= 30 or self.done * 10 // self.total > (self.done - 1) * 10 // self.total:
            left = (now - self.start) / self.done * (self.total - self.done)
            print(f"  {self.what}: {self.done}/{self.total}{note}, {self.done / max(now - self.start, 1e-9):.3g}/s, "
                  f"{left:.0f} s left", flush=True)
            self.last = now


def check_free_space(args, run_dir, step, agent, action_dim):
    """Say it before the hours: warn in one line when what the run will still write does not fit the free space (the
    replay files, one entry a step, plus two checkpoints at the peak of a checkpoint write)."""
    entry = 3 * 84 * 84 + 4 * action_dim + 4 + 8  # a frame (uint8), its action and reward (float32), its index (int64)
    networks = (agent.critic, agent.critic_target, agent.actor, agent.decoder)
    weights = sum(4 * p.numel() for network in networks for p in network.parameters())
    need = (args.total_timesteps - step) * 1.01 * entry + 2 * 3 * weights  # resets; weights and Adam's two moments
    free = shutil.disk_usage(run_dir).free
    if need > free:
        print(f"warning: {run_dir} has {free / 1e9:.2f} GB free; this run will write about {need / 1e9:.2f} GB more "
              "(replay and checkpoints); free some space or move it (--output-dir) before it fills", file=sys.stderr)


def write_failure(e, run_dir, saved_step):
    """A failed write of a run output (no space, a quota, an I/O error, a read-only folder) as one line; other
    OSErrors keep their traceback."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS:
              "the file system is read-only", errno.EACCES: "permission denied", errno.EIO: "an I/O error",
              errno.EFBIG: "the file size limit is exceeded"}.get(e.errno)
    if reason is None:
        return
    last = f"the last good checkpoint is step {saved_step}" if saved_step is not None else "no checkpoint was written"
    fail(f"writing {e.filename or 'a run output in ' + str(run_dir)} failed: {reason}; {last}; "
                   f"fix the cause, then {resume_hint(run_dir, saved_step)}")


def resume_hint(run_dir, saved_step):
    if saved_step is None:
        return "no checkpoint yet, nothing to resume"
    return f"resume with: python sgqn.py --resume {run_dir}"


def finite_losses(losses, step, run_dir, saved_step):
    """The losses as floats (a host copy, made only when logging or checkpointing); stop if one is NaN or inf."""
    values = {name: float(value) for name, value in losses.items()}
    for name, value in values.items():
        if not math.isfinite(value):
            kept = f"the last good checkpoint (step {saved_step}) is in {run_dir}" if saved_step is not None else \
                "no checkpoint was written"
            fail(f"loss {name} is {value} at step {step}: training diverged; {kept}")
    return values


def log(metrics, **row):
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()


def saliency_picture(critic, decoder, actor, obs, rho):
    """One row per frame: RGB | guided-backprop map | binary mask | predicted mask. obs: (9, 84, 84) uint8."""
    x = torch.as_tensor(obs, device=critic.q1[0].weight.device).float()[None]
    with torch.no_grad():
        features = critic.encoder(x)
        action = actor(features)[0]
        predicted = torch.sigmoid(decoder(critic.projection(features), action))[0]  # (9, 84, 84)
    attribution = guided_backprop(critic, x, action)
    mask = saliency_mask(attribution, rho)[0]
    per_frame = attribution[0].abs().view(-1, 3, *x.shape[2:]).amax(1)  # (k, 84, 84)
    rows = []
    for f in range(x.shape[1] // 3):
        gray = [per_frame[f] / per_frame[f].max().clamp(min=1e-12), mask[3 * f], predicted[3 * f : 3 * f + 3].mean(0)]
        tiles = [obs[3 * f : 3 * f + 3].transpose(1, 2, 0)]
        tiles += [np.repeat((g.cpu().numpy() * 255).astype(np.uint8)[..., None], 3, 2) for g in gray]
        rows.append(np.concatenate(tiles, 1))
    return np.concatenate(rows, 0)


def run_evaluation(step, final, eval_envs, agent, args, run_dir, metrics, stop):
    """Every eval mode: progress lines, each mode's result as soon as it is done, rows into metrics.jsonl, a table
    and, at the end of a run, the saliency pictures. -> results."""
    start, results, device = time.time(), {}, agent.log_alpha.device
    episodes = args.final_eval_episodes if final else args.eval_episodes
    for mode, eval_env in eval_envs.items():
        frames, returns, pacer = [], [], Pacer(f"evaluating {mode} at step {step}, episode", episodes)
        for episode_return in evaluate(eval_env, agent.critic.encoder, agent.actor, episodes, device, frames):
            returns.append(episode_return)
            pacer.tick(f", mean {np.mean(returns):.1f}")
            if stop.signal:  # a checkpoint precedes every evaluation: nothing to save
                raise KeyboardInterrupt
        results[mode] = dict(mean=float(np.mean(returns)), std=float(np.std(returns)), episodes=len(returns))
        log(metrics, step=step, mode=mode, eval_return=results[mode]["mean"], eval_std=results[mode]["std"],
            episodes=len(returns))
        if final:
            obs = frames[min(15, len(frames) - 1)]  # a frame into the episode
            picture = saliency_picture(agent.critic, agent.decoder, agent.actor, obs, args.rho)
            iio.imwrite(run_dir / f"saliency_{mode}.png", picture.repeat(2, 0).repeat(2, 1))
            if args.capture_video:  # the newest frame's row of each step, x4: video codecs work in 16-pixel blocks
                clip = [saliency_picture(agent.critic, agent.decoder, agent.actor, f, args.rho)[-84:] for f in frames]
                iio.imwrite(run_dir / f"eval_{mode}.mp4", np.stack(clip).repeat(4, 1).repeat(4, 2), fps=25)
    seconds = time.time() - start
    log(metrics, step=step, eval_seconds=seconds)
    print(f"\nevaluation at step {step} ({seconds:.0f} s)\n{'mode':<12}{'mean':>9}{'std':>9}{'episodes':>10}")
    for mode, r in results.items():
        print(f"{mode:<12}{r['mean']:>9.1f}{r['std']:>9.1f}{r['episodes']:>10}", flush=True)
    return results, seconds


# ---------------------------------------------------------------- main
def main(args, saved=None):
    """Train and evaluate as `args` says (or, with --eval-only, evaluate a checkpoint); returns the run folder.
    `saved`: the checkpoint that parse_args read for --resume or --eval-only."""
    check_args(args)
    if args.checkpoint and saved is None:
        saved = read_checkpoint(args.checkpoint)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    env, eval_envs = make_envs(args)
    obs_shape, action_dim = env.observation_shape, env.action_shape[0]
    agent = make_agent(obs_shape, action_dim, args, device)
    if saved:
        load_agent(agent, saved, args.checkpoint or args.resume)
    try:
        overlay = None if args.eval_only else (load_images(args.overlay_dir, args.overlay_images, obs_shape[-1], rng)
                                               if args.overlay_dir else procedural_images(
            args.overlay_images, obs_shape[-1], torch.Generator().manual_seed(args.seed))).to(device)
    except ValueError as e:
        fail(str(e), 2)
    buffer = ReplayBuffer(args.buffer_size, (3, *obs_shape[1:]), action_dim, args.frame_stack)
    run_dir = Path(args.resume) if args.resume else make_run_dir(args)  # everything is checked: the run starts
    lock = lock_run_dir(run_dir)
    if args.resume:
        progress, obs = restore(saved, buffer, env, eval_envs, rng, run_dir)
        print(f"resumed {run_dir} at step {progress.step} of {args.total_timesteps}")
    else:
        progress, (obs, _) = Progress(step=saved["progress"]["step"] if args.eval_only else 0), env.reset()
        buffer.add(obs[-3:], first=True)
    stop, saved_step = StopSignal(), progress.step if args.resume else None
    metrics = open(run_dir / "metrics.jsonl", "a")
    print(f"run folder: {run_dir}  device: {device}  env: {args.env_id}  action repeat: {args.action_repeat}")
    start_time, first_step, eval_seconds = time.time(), progress.step, 0.0
    try:
        if not args.eval_only:
            write_json(run_dir / "args.json", asdict(args))  # (a resumed run's --total-timesteps may extend it)
            check_free_space(args, run_dir, progress.step, agent, action_dim)
        while True:
            eval_due = progress.step % args.eval_freq == 0 or progress.step == args.total_timesteps or args.eval_only
            if not progress.updates_due:  # (a run stopped amid the catch-up finishes its updates first)
                if eval_due:  # step 0 included: the untrained agent, as DMC-GB's train.py
                    final = progress.step == args.total_timesteps or args.eval_only
                    progress.results, seconds = run_evaluation(progress.step, final, eval_envs, agent, args, run_dir,
                                                               metrics, stop)
                    eval_seconds += seconds
                if progress.step == args.total_timesteps or args.eval_only:
                    break
                # act, step the env, store
                progress.step += 1
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
                if progress.step == args.learning_starts:
                    print(f"step {progress.step}: seed steps done, catching up with {progress.step} updates",
                          flush=True)
                eval_due = progress.step % args.eval_freq == 0 or progress.step == args.total_timesteps
            pacer = Pacer(f"catch-up at step {progress.step}, update", progress.updates_due) \
                if progress.updates_due > 1 else None
            while progress.updates_due and not stop.signal:
                b_obs, b_action, b_reward, b_next_obs = buffer.sample(args.batch_size, rng)
                batch = (random_shift(torch.as_tensor(b_obs, device=device), args.shift_pad).float(),  # (B, 9, 84, 84)
                         torch.as_tensor(b_action, device=device),  # (B, A)
                         torch.as_tensor(b_reward, device=device)[:, None],  # (B, 1)
                         random_shift(torch.as_tensor(b_next_obs, device=device), args.shift_pad).float())  # own shift
                progress.losses.update(update(agent, batch, progress.step, args, overlay))
                progress.updates_due -= 1
                pacer and pacer.tick()
            if not progress.updates_due and (progress.done or eval_due):  # log the step
                elapsed = time.time() - start_time
                sps = (progress.step - first_step) / max(elapsed - eval_seconds, 1e-9)  # training only
                eval_share = eval_seconds / elapsed
                row = dict(step=progress.step, frames=progress.step * args.action_repeat, sps=sps,
                           elapsed_hours=elapsed / 3600, eval_share=eval_share,  # time left at this speed and share:
                           eta_hours=(args.total_timesteps - progress.step) / max(sps, 1e-9) / max(1 - eval_share, 0.01)
                           / 3600, **finite_losses(progress.losses, progress.step, run_dir, saved_step))
                if progress.done:
                    row["episodic_return"] = progress.episode_return
                    obs, _ = env.reset()
                    buffer.add(obs[-3:], first=True)
                    progress.episode_return, progress.done = 0.0, False
                log(metrics, **row)
                print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if stop.signal or eval_due or progress.step % args.checkpoint_freq == 0:
                finite_losses(progress.losses, progress.step, run_dir, saved_step)
                saved_step = save_checkpoint(run_dir, agent, buffer, env, eval_envs, rng, metrics, args, progress)
            if stop.signal:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(f"interrupted; the evaluation's outputs so far are in {run_dir}" if args.eval_only else
              f"interrupted at step {saved_step or 0}; {resume_hint(run_dir, saved_step)}", file=sys.stderr)
        raise SystemExit(128 + (stop.signal or signal.SIGINT)) from None
    except Exception as e:  # a failed write is one line; a real bug prints its traceback, then where the outputs are
        if isinstance(e, OSError):
            write_failure(e, run_dir, saved_step)
        traceback.print_exc()
        fail(f"the run stopped after step {progress.step} (traceback above); its outputs so far are in {run_dir}; "
             f"{resume_hint(run_dir, saved_step)}")
    finally:
        metrics.close()
        lock.close()
        stop.restore()
    results = dict(step=progress.step, results=progress.results)
    write_json(run_dir / "results.json", {"checkpoint": str(args.checkpoint), **results} if args.eval_only else results)
    print(f"results written to {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
