"""Tests of the SGQN reference implementation: `python -m pytest -q test_sgqn.py`.

Three sections: envs.py (DMC-GB scenes against DMC-GB's own per-pixel code), the SG-SAC mechanisms of sgqn.py
(against oracles written here: guided backprop by a custom autograd ReLU and by captum-style module hooks, the
mask by the authors' torch.quantile formula, the update by a plain reference step), and end-to-end runs of the
real script. Real DMC-GB files in ../shared/dmcgb are used when present, small synthetic ones otherwise.
"""

import collections
import copy
import dataclasses
import fcntl
import functools
import hashlib
import http.server
import importlib.util
import json
import math
import operator
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import envs
import sgqn

# ---- envs.py ----
# Uses the real DMC-GB files in ../shared/dmcgb when present and small synthetic stand-ins when not.
# DMC-GB's own per-pixel code is transcribed below (_envs_dmcgb_*) as the oracle for our vectorised version.

ENVS_SHARED = Path(__file__).resolve().parent.parent / "shared" / "dmcgb"
ENVS_HAVE_SHARED = (ENVS_SHARED / "video_easy" / "video0.mp4").is_file() and (ENVS_SHARED / "color_easy.pt").is_file()
ENVS_COLOR_KEYS = ("grid_rgb1", "grid_rgb2", "self_rgb", "skybox_rgb")


def _envs_dmcgb_rgb_to_hsv(r, g, b):
    """DMC-GB's wrappers.rgb_to_hsv, written out by hand."""
    high, low = max(r, g, b), min(r, g, b)
    if high == low:
        return 0.0, 0.0, high
    span = high - low
    red, green, blue = (high - r) / span, (high - g) / span, (high - b) / span
    if r == high:
        hue = blue - green
    elif g == high:
        hue = 2.0 + red - blue
    else:
        hue = 4.0 + green - red
    return (hue / 6.0) % 1.0, span / high, high


def _envs_dmcgb_is_green(r, g, b):
    """DMC-GB's do_green_screen test for one pixel of 0-255 ints."""
    h, s, v = _envs_dmcgb_rgb_to_hsv(r / 255.0, g / 255.0, b / 255.0)
    h, s, v = h * 360, s * 255, v * 255
    return 100 <= h <= 185 and 80 <= s <= 255 and 70 <= v <= 255


def _envs_dmcgb_green_screen(x, bg):
    """DMC-GB's do_green_screen, pixel by pixel (its PIL RGBA round trip leaves RGB values unchanged)."""
    out = x.copy()
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            if _envs_dmcgb_is_green(*(int(c) for c in x[:, i, j])):
                out[:, i, j] = bg[:, i, j]
    return out


def _envs_dmcgb_interpolate_bg(bg, size):
    """DMC-GB's VideoWrapper._interpolate_bg on a (3, H, W) uint8 array."""
    bg = torch.from_numpy(bg).float().unsqueeze(0) / 255.0
    bg = F.interpolate(bg, size=size, mode="bilinear", align_corners=False)
    return (bg * 255.0).byte().squeeze(0).numpy()


def _envs_decode(path):
    """All frames of a video as DMC-GB keeps them: (N, 3, H, W), a moveaxis view of the decoded buffer."""
    with imageio.get_reader(path, "ffmpeg") as reader:
        return np.moveaxis(np.stack([np.asarray(f) for f in reader]), -1, 1)


def _envs_blob(data):
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def _envs_write_colors(path, seed):
    rng = np.random.default_rng(seed)
    torch.save([{k: rng.uniform(0, 1, 3) for k in ENVS_COLOR_KEYS} for _ in range(100)], path)


def _envs_write_video(path, seed, n_frames):
    """A 64x64 video of random 8x8 blocks; each (seed, frame) looks different."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3))
    frames = [np.kron((base + 37 * t) % 256, np.ones((8, 8, 1))).astype(np.uint8) for t in range(n_frames)]
    imageio.mimwrite(path, frames, fps=25, macro_block_size=1)


def _envs_make_data_dir(root, real):
    """A complete data dir: real tables and real videos reused cyclically (symlinks), or synthetic ones."""
    for mode in ("video_easy", "video_hard"):
        (root / mode).mkdir(parents=True)
    if real:
        for name in ("color_easy.pt", "color_hard.pt"):
            shutil.copy(ENVS_SHARED / name, root / name)
        for mode, n in envs.NUM_VIDEOS.items():
            sources = sorted((ENVS_SHARED / mode).glob("video*.mp4"))
            for i in range(n):
                (root / mode / f"video{i}.mp4").symlink_to(sources[i % len(sources)])
        return root
    _envs_write_colors(root / "color_easy.pt", 0)
    _envs_write_colors(root / "color_hard.pt", 1)
    for i in range(10):  # ten distinct easy videos of 6 frames, so episodes wrap around quickly
        _envs_write_video(root / "video_easy" / f"video{i}.mp4", i, 6)
    for i in range(100):
        if i < 4:
            _envs_write_video(root / "video_hard" / f"video{i}.mp4", 100 + i, 5)
        else:
            shutil.copy(root / "video_hard" / f"video{i % 4}.mp4", root / "video_hard" / f"video{i}.mp4")
    return root


@pytest.fixture(scope="module")
def envs_synthetic_dir(tmp_path_factory):
    return _envs_make_data_dir(tmp_path_factory.mktemp("envs_synthetic"), real=False)


@pytest.fixture(scope="module")
def envs_real_dir(tmp_path_factory, envs_synthetic_dir):
    """Real DMC-GB files when ../shared has them, the synthetic ones otherwise."""
    if not ENVS_HAVE_SHARED:
        return envs_synthetic_dir
    return _envs_make_data_dir(tmp_path_factory.mktemp("envs_real"), real=True)


@pytest.fixture(autouse=True)
def _envs_unverified_data(monkeypatch):
    """Test data folders reuse real videos cyclically or are synthetic, so they do not have DMC-GB's git blob ids;
    the tests of the check itself delete this."""
    monkeypatch.setenv("DMCGB_VERIFY", "0")


@pytest.fixture
def envs_no_download(monkeypatch):
    monkeypatch.setenv("DMCGB_DOWNLOAD", "0")


def _envs_actions(env, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, env.action_shape).astype(np.float32) for _ in range(n)]


def _envs_raw_render(env, size=84):
    return env._physics.render(height=size, width=size, camera_id=0).transpose(2, 0, 1)


def test_envs_shapes_and_dtypes():
    env = envs.make_env("walker", seed=0)
    assert env.observation_shape == (9, 84, 84) and env.action_shape == (6,)
    assert env.max_episode_steps == 250
    for bound, value in ((env.action_low, -1), (env.action_high, 1)):
        assert bound.dtype == np.float32 and bound.shape == (6,) and np.all(bound == value)
    obs, info = env.reset()
    assert obs.dtype == np.uint8 and obs.shape == (9, 84, 84) and obs.flags.c_contiguous and info == {}
    obs, reward, terminated, truncated, info = env.step(env.action_high * 0.5)
    assert obs.dtype == np.uint8 and obs.shape == (9, 84, 84)
    assert type(reward) is float and terminated is False and truncated is False
    small = envs.make_env("ball_in_cup-catch", seed=0, frame_stack=2, image_size=32, action_repeat=8)
    assert small.observation_shape == (6, 32, 32) and small.reset()[0].shape == (6, 32, 32)
    assert small.action_shape == (2,) and small.max_episode_steps == 125


def test_envs_frame_stack_oldest_first():
    env = envs.make_env("cartpole", seed=0)
    obs0, _ = env.reset()
    first = _envs_raw_render(env)
    assert all(np.array_equal(obs0[3 * i: 3 * i + 3], first) for i in range(3))
    frames = [first]
    for action in _envs_actions(env, 4):
        obs = env.step(action)[0]
        frames.append(_envs_raw_render(env))
        assert not np.array_equal(frames[-1], frames[-2])
        expected = ([frames[0]] * 3 + frames)[-3:]
        assert np.array_equal(obs, np.concatenate(expected))


def test_envs_action_repeat_matches_dm_control():
    from dm_control import suite

    env = envs.make_env("cartpole", seed=3, action_repeat=8)
    raw = suite.load("cartpole", "swingup", task_kwargs={"random": 3})
    obs, _ = env.reset()
    raw.reset()
    assert env.max_episode_steps == 125
    for t, action in enumerate(_envs_actions(env, 125), start=1):
        obs, reward, terminated, truncated, _ = env.step(action)
        expected = 0.0
        for _ in range(8):
            time_step = raw.step(action)
            expected += time_step.reward
        assert reward == expected and terminated is False
        assert truncated == (t == 125) == time_step.last()  # 1000 simulator steps, as dm_control's own limit
        if t in (1, 77, 125):  # rendered after the last repeated step, camera 0
            assert np.array_equal(obs[6:], raw.physics.render(84, 84, camera_id=0).transpose(2, 0, 1))
    assert np.array_equal(env._physics.get_state(), raw.physics.get_state())


def test_envs_actions_checked_and_mapped():
    env = envs.make_env("cartpole", seed=0)
    env.reset()
    for bad in (np.array([1.5]), np.array([np.nan]), np.zeros(2), np.zeros(()), np.full(50, 0.123456789)):
        with pytest.raises(ValueError) as info:
            env.step(bad)
        assert "\n" not in str(info.value)
    env.step(np.array([-1.0]))
    assert env._physics.data.ctrl[0] == -1.0
    env.step(np.array([1 + 1e-7], np.float32))  # a tanh's rounding error is forgiven and clipped
    assert env._physics.data.ctrl[0] == 1.0


def test_envs_same_seed_same_frames():
    a, b, c = (envs.make_env("walker", seed=s) for s in (7, 7, 8))
    obs_a, obs_b, obs_c = a.reset()[0], b.reset()[0], c.reset()[0]
    assert np.array_equal(obs_a, obs_b) and not np.array_equal(obs_a, obs_c)
    for action in _envs_actions(a, 5):
        step_a, step_b = a.step(action), b.step(action)
        assert np.array_equal(step_a[0], step_b[0]) and step_a[1] == step_b[1]


@pytest.mark.parametrize("mode", ["color_easy", "color_hard"])
def test_envs_color_modes_change_pixels_not_physics(mode, envs_real_dir):
    from dm_control.suite import common

    assets_before = dict(common.ASSETS)
    train = envs.make_env("walker", seed=5)
    color = envs.make_env("walker", seed=5, mode=mode, data_dir=envs_real_dir)
    table = envs.load_colors(envs_real_dir / f"{mode}.pt")
    draws = np.random.RandomState(5)
    for episode in range(2):
        obs_t, _ = train.reset()
        obs_c, info = color.reset()
        if episode == 0:
            first_train = obs_t
        index = draws.randint(len(table))
        assert info == {"color": index}
        rgba = color._physics.named.model.mat_rgba["self"]
        assert np.allclose(rgba, list(table[index]["self_rgb"]) + [1], atol=1e-6)
        assert (obs_t != obs_c).mean() > 0.5  # sky, floor and body repainted
        for action in _envs_actions(train, 6, seed=episode):
            step_t, step_c = train.step(action), color.step(action)
            assert step_t[1] == step_c[1] and step_t[2:4] == step_c[2:4]
            assert np.array_equal(train._physics.get_state(), color._physics.get_state())
    assert common.ASSETS == assets_before  # dm_control's shared assets untouched
    assert np.array_equal(envs.make_env("walker", seed=5).reset()[0], first_train)  # a new train env looks the same


def test_envs_edit_assets_sets_dmcgb_attributes():
    import xml.etree.ElementTree as ET
    from dm_control.suite import common

    assets_before = dict(common.ASSETS)
    colors = {"grid_rgb1": np.array([0.1, 0.2, 0.3]), "grid_rgb2": np.array([0.4, 0.5, 0.6]),
              "self_rgb": np.array([0.7, 0.8, 0.9]), "skybox_rgb": np.array([0.25, 0.5, 0.75])}
    edited = envs.edit_assets(common.ASSETS, colors)
    materials = ET.fromstring(edited["./common/materials.xml"])
    skybox = ET.fromstring(edited["./common/skybox.xml"]).find("./asset/texture")
    grid = materials.find("./asset/texture[@name='grid']")
    assert (grid.get("rgb1"), grid.get("rgb2"), grid.get("markrgb")) == ("0.1 0.2 0.3", "0.4 0.5 0.6", ".2 .3 .4")
    assert materials.find("./asset/material[@name='self']").get("rgba") == "0.7 0.8 0.9 1"
    assert materials.find("./asset/material[@name='self_default']").get("rgba") == ".7 .5 .3 1"
    assert (skybox.get("rgb1"), skybox.get("rgb2"), skybox.get("markrgb")) == ("0.25 0.5 0.75", "0 0 0", "1 1 1")
    assert isinstance(edited["./common/materials.xml"], bytes) and common.ASSETS == assets_before

    green = "0.2 0.8 0.2"
    for mode, floor_green in (("video_easy", False), ("video_hard", True)):
        edited = envs.edit_assets(common.ASSETS, envs.green_settings(mode))
        sky = ET.fromstring(edited["./common/skybox.xml"]).find("./asset/texture")
        grid = ET.fromstring(edited["./common/materials.xml"]).find("./asset/texture[@name='grid']")
        assert [sky.get(a) for a in ("rgb1", "rgb2", "markrgb")] == [green] * 3
        assert ([grid.get(a) for a in ("rgb1", "rgb2", "markrgb")] == [green] * 3) == floor_green
    assert envs.green_settings("train") == {} == envs.green_settings("color_hard")


def test_envs_greenscreen_matches_dmcgb_per_pixel():
    import colorsys

    rng = np.random.default_rng(0)
    # random colours, plus random colours whose hue, saturation or value lies near a bound of the green box
    pool = rng.integers(0, 256, (2_000_000, 3))
    r, g, b = pool.T / 255.0
    high, low = pool.max(1) / 255.0, pool.min(1) / 255.0
    span = np.maximum(high - low, 1e-9)
    hue = np.where(r == high, (g - b) / span, np.where(g == high, 2 + (b - r) / span, 4 + (r - g) / span))
    hue, sat, val = hue / 6 % 1 * 360, (high - low) / np.maximum(high, 1e-9) * 255, high * 255
    near = (np.abs(hue - 100) < 0.2) | (np.abs(hue - 185) < 0.2) | (np.abs(sat - 80) < 0.2) | (val == 70)
    picks = np.concatenate([pool[near][:60000], pool[-60000:]])
    picks = picks[: len(picks) // 400 * 400]
    frame = picks.T.reshape(3, -1, 400).astype(np.uint8)
    background = rng.integers(0, 256, frame.shape, dtype=np.uint8)
    out = envs.greenscreen(frame, background)
    expected_green = np.array([_envs_dmcgb_is_green(*map(int, p)) for p in picks]).reshape(frame.shape[1:])
    assert near.sum() > 5000 and 1000 < expected_green.sum() < expected_green.size - 1000
    assert np.array_equal(out, np.where(expected_green, background, frame))
    assert np.array_equal(out[:, :2, :3], _envs_dmcgb_green_screen(frame[:, :2, :3], background[:, :2, :3]))
    for c in pool[:500]:  # the hand-written oracle is colorsys's formula
        assert _envs_dmcgb_rgb_to_hsv(*(c / 255.0)) == colorsys.rgb_to_hsv(*(c / 255.0))


def test_envs_resize_matches_torch_interpolate(envs_real_dir):
    noise = np.random.default_rng(0).integers(0, 256, (20, 240, 240, 3), dtype=np.uint8)
    batches = [np.moveaxis(noise, -1, 1)]
    if ENVS_HAVE_SHARED:
        batches.append(_envs_decode(envs_real_dir / "video_hard" / "video3.mp4")[:40])
    for frames, size in [(frames, size) for frames in batches for size in (84, 64)]:
        ours = np.stack([envs.resize_frame(np.moveaxis(f, 0, -1), size) for f in frames])
        dmcgb = np.stack([_envs_dmcgb_interpolate_bg(f, (size, size)) for f in frames])
        batch = F.interpolate(torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0, size=(size, size),
                              mode="bilinear", align_corners=False)
        assert ours.dtype == np.uint8 and ours.shape == (len(frames), 3, size, size)
        assert np.array_equal(ours, dmcgb) and np.array_equal(ours, (batch * 255.0).byte().numpy())
        # and it is a bilinear resize: close to a float64 numpy one (half-pixel centres)
        scale = frames.shape[-1] / size
        src = np.clip((np.arange(size) + 0.5) * scale - 0.5, 0, frames.shape[-1] - 1)
        i0 = np.floor(src).astype(int)
        i1, w = np.minimum(i0 + 1, frames.shape[-1] - 1), src - i0
        x = frames.astype(np.float64)
        rows = x[:, :, i0] * (1 - w)[:, None] + x[:, :, i1] * w[:, None]
        ref = rows[..., i0] * (1 - w) + rows[..., i1] * w
        assert -1.01 < (ours - ref).min() and (ours - ref).max() < 0.01  # truncated, not rounded


@pytest.mark.parametrize("mode", ["video_easy", "video_hard"])
def test_envs_video_composite_matches_dmcgb(mode, envs_real_dir):
    env = envs.make_env("cartpole", seed=1, mode=mode, data_dir=envs_real_dir)
    obs, info = env.reset()
    video = _envs_decode(envs_real_dir / mode / "video1.mp4")
    green_fraction = []
    for t, action in enumerate([None] + _envs_actions(env, 3)):
        if action is not None:
            obs, _, _, _, info = env.step(action)
        assert info == {"video": 1, "video_frame": t}
        green = _envs_raw_render(env)  # the green-screen scene itself
        background = _envs_dmcgb_interpolate_bg(video[t % len(video)], (84, 84))
        expected = _envs_dmcgb_green_screen(green, background)
        assert np.array_equal(obs[6:], expected)
        assert not np.array_equal(expected, green)
        green_fraction.append(np.mean(np.all(expected == background, 0) & np.any(green != background, 0)))
    assert min(green_fraction) > (0.6 if mode == "video_hard" else 0.3)


def test_envs_video_order_and_one_frame_per_step(envs_synthetic_dir):
    env = envs.make_env("cartpole", seed=0, mode="video_easy", data_dir=envs_synthetic_dir)
    videos = [_envs_decode(envs_synthetic_dir / "video_easy" / f"video{i}.mp4") for i in range(10)]
    assert all(len(v) == 6 for v in videos)
    for episode in range(12):
        obs, info = env.reset()
        k = (episode + 1) % 10  # DMC-GB: the first episode uses video 1, then 2, ..., 9, 0, 1, ...
        assert info == {"video": k, "video_frame": 0}
        steps = 8 if episode in (0, 9) else 0
        for t in range(1, steps + 1):
            obs, _, _, _, info = env.step(np.zeros(1, np.float32))
            assert info == {"video": k, "video_frame": t % 6}
            if t in (1, 7):  # one frame per step, wrapping at the end of the video
                background = _envs_dmcgb_interpolate_bg(videos[k][t % 6], (84, 84))
                assert np.array_equal(obs[6:], _envs_dmcgb_green_screen(_envs_raw_render(env), background))
                other = _envs_dmcgb_interpolate_bg(videos[(k + 1) % 10][t % 6], (84, 84))
                assert not np.array_equal(obs[6:], _envs_dmcgb_green_screen(_envs_raw_render(env), other))
    assert len(env._videos) == envs.MAX_CACHED_VIDEOS


def test_envs_unknown_ids_and_modes(envs_synthetic_dir):
    from dm_control import suite

    assert envs.parse_env_id("ball_in_cup", suite) == ("ball_in_cup", "catch")
    assert envs.parse_env_id("ball_in_cup-catch", suite) == ("ball_in_cup", "catch")
    assert envs.parse_env_id("walker-stand", suite) == ("walker", "stand")
    assert envs.parse_env_id("cartpole-balance", suite) == ("cartpole", "balance")
    assert {d: t for d, t in envs.TASKS.items() if d in ("cartpole", "walker", "finger", "ball_in_cup")} == {
        "cartpole": ("cartpole", "swingup"), "walker": ("walker", "walk"), "finger": ("finger", "spin"),
        "ball_in_cup": ("ball_in_cup", "catch")}
    for bad, words in (("hopper_walk", ["walker", "domain-task"]), ("walker-fly", ["walk", "stand", "run"]),
                       ("ball-in-cup", ["ball_in_cup-catch"])):
        with pytest.raises(ValueError) as info:
            envs.make_env(bad, seed=0)
        assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)
    with pytest.raises(ValueError) as info:
        envs.make_env("walker", seed=0, mode="video_medium")
    assert "\n" not in str(info.value) and all(m in str(info.value) for m in envs.MODES)
    with pytest.raises(ValueError):
        envs.make_env("walker", seed=0, action_repeat=0)
    with pytest.raises(ValueError, match="default cartpole model"):  # test modes reload cartpole.xml
        envs.make_env("cartpole-two_poles", seed=0, mode="video_easy", data_dir=envs_synthetic_dir)


def test_envs_missing_data_errors(tmp_path, envs_synthetic_dir, envs_no_download, monkeypatch):
    for mode, count in (("color_hard", 1), ("video_easy", 10), ("video_hard", 100)):
        with pytest.raises(FileNotFoundError) as info:
            envs.make_env("cartpole", seed=0, mode=mode, data_dir=tmp_path)
        message = str(info.value)
        assert "\n" not in message and f"{count} missing" in message and str(tmp_path) in message
        assert "DMCGB_DATA_DIR" in message and envs.DATA_COMMIT in message
    partial = tmp_path / "partial"
    shutil.copytree(envs_synthetic_dir / "video_easy", partial / "video_easy")
    (partial / "video_easy" / "video7.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 missing \(video_easy/video7.mp4\)"):
        envs.make_env("cartpole", seed=0, mode="video_easy", data_dir=partial)
    # the data dir comes from DMCGB_DATA_DIR, then XDG_CACHE_HOME
    monkeypatch.setenv("DMCGB_DATA_DIR", str(tmp_path / "env"))
    assert envs.resolve_data_dir() == tmp_path / "env" and envs.resolve_data_dir(partial) == partial
    monkeypatch.delenv("DMCGB_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert envs.resolve_data_dir() == tmp_path / "xdg" / "sgqn" / "dmcgb"
    # offline: downloading is tried and fails
    monkeypatch.setenv("DMCGB_DOWNLOAD", "1")
    monkeypatch.setenv("DMCGB_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(FileNotFoundError) as info:
        envs.make_env("cartpole", seed=0, mode="color_easy", data_dir=tmp_path / "offline")
    assert "\n" not in str(info.value) and "download failed" in str(info.value)
    assert not list((tmp_path / "offline").glob("*"))


def test_envs_blob_table():
    assert len(envs.GIT_BLOBS) == 112 and len(set(envs.GIT_BLOBS.values())) == 112
    assert [n for n in envs.GIT_BLOBS if n.startswith("video_hard")] == envs.required_files("video_hard")
    assert list(envs.GIT_BLOBS)[:12] == envs.required_files("color_easy") + envs.required_files("color_hard") + \
        envs.required_files("video_easy")
    assert envs.GIT_BLOBS["video_hard/video99.mp4"] == "a7413bc08d0e7285941999488eac4ed7afb84d26"
    checked = 0
    if ENVS_SHARED.is_dir():  # the shared subset must be what the table says
        for path in sorted(ENVS_SHARED.rglob("*")):
            name = path.relative_to(ENVS_SHARED).as_posix()
            if name in envs.GIT_BLOBS:
                assert envs.git_blob_id(path) == envs.GIT_BLOBS[name] == _envs_blob(path.read_bytes())
                checked += 1
        table = dict(line.split()[::-1] for line in (ENVS_SHARED / "GIT_BLOBS").read_text().splitlines())
        assert table == envs.GIT_BLOBS
    assert checked == (108 if ENVS_HAVE_SHARED else 0)  # 2 colour tables, 6 video_easy and 100 video_hard videos


def test_envs_git_blob_id(tmp_path):
    for data, known in ((b"", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"),
                        (b"hello\n", "ce013625030ba8dba906f756967f9e9ca394464a")):
        (tmp_path / "f").write_bytes(data)
        assert envs.git_blob_id(tmp_path / "f") == known == _envs_blob(data)


@pytest.fixture
def envs_http_server(tmp_path):
    """A loopback HTTP server over tmp_path/served; yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_envs_download_verified_and_corrupt_rejected(tmp_path, envs_http_server, monkeypatch):
    served, url = envs_http_server
    if ENVS_HAVE_SHARED:
        shutil.copy(ENVS_SHARED / "color_easy.pt", served / "color_easy.pt")
    else:  # no real file: serve a synthetic table and expect its blob id instead
        _envs_write_colors(served / "color_easy.pt", 0)
        monkeypatch.setitem(envs.GIT_BLOBS, "color_easy.pt", _envs_blob((served / "color_easy.pt").read_bytes()))
    good = (served / "color_easy.pt").read_bytes()
    (served / "color_hard.pt").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    monkeypatch.setenv("DMCGB_URL", url)
    monkeypatch.setenv("DMCGB_DOWNLOAD", "1")
    data = tmp_path / "data"

    env = envs.make_env("cartpole", seed=0, mode="color_easy", data_dir=data)
    assert (data / "color_easy.pt").read_bytes() == good and "color" in env.reset()[1]
    with pytest.raises(envs.DataError) as info:
        envs.make_env("cartpole", seed=0, mode="color_hard", data_dir=data)
    assert "\n" not in str(info.value) and "color_hard.pt is corrupt" in str(info.value)
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".verified")) == ["color_easy.pt"]  # nothing half-downloaded kept

    monkeypatch.setenv("DMCGB_URL", served.as_uri())  # file:// works too
    envs.make_env("cartpole", seed=0, mode="color_easy", data_dir=tmp_path / "via_file")
    assert (tmp_path / "via_file" / "color_easy.pt").read_bytes() == good


def test_envs_local_files_verified_all_problems_in_one_error(tmp_path, envs_no_download, monkeypatch):
    monkeypatch.delenv("DMCGB_VERIFY")
    data = tmp_path / "data"
    (data / "video_easy").mkdir(parents=True)
    blobs = {}
    for i in range(10):
        _envs_write_video(data / "video_easy" / f"video{i}.mp4", i, 3)
        blobs[f"video_easy/video{i}.mp4"] = envs.git_blob_id(data / "video_easy" / f"video{i}.mp4")
    _envs_write_colors(data / "color_hard.pt", 1)
    blobs["color_hard.pt"] = envs.git_blob_id(data / "color_hard.pt")
    for name, blob in blobs.items():  # the files stand in for DMC-GB's: their blob ids are the pinned ones
        monkeypatch.setitem(envs.GIT_BLOBS, name, blob)
    envs.ensure_data(["video_easy", "color_hard"], data)
    assert (data / ".verified.json").is_file()
    for i in (2, 3, 7):  # corrupt three videos (same size, new mtime), delete one, corrupt the colour table
        path = data / "video_easy" / f"video{i}.mp4"
        path.write_bytes(path.read_bytes()[:-1] + b"\0")
    (data / "video_easy" / "video5.mp4").unlink()
    (data / "color_hard.pt").write_bytes(b"not a table")
    with pytest.raises(envs.DataError) as info:
        envs.ensure_data(["video_easy", "color_hard", "train"], data)
    message = str(info.value)
    assert "\n" not in message and "1 missing (video_easy/video5.mp4)" in message
    assert "4 corrupt (video_easy/video{2-3,7}.mp4, color_hard.pt)" in message and "delete the corrupt ones" in message
    with pytest.raises(envs.DataError):  # never used: make_env checks too
        envs.make_env("cartpole", seed=0, mode="color_hard", data_dir=data)


def test_envs_colors_load_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save([Evil()], tmp_path / "color_easy.pt")
    with pytest.raises(Exception):
        envs.load_colors(tmp_path / "color_easy.pt")
    assert not marker.exists()
    _envs_write_colors(tmp_path / "ok.pt", 3)
    table = envs.load_colors(tmp_path / "ok.pt")
    assert len(table) == 100 and set(table[0]) == set(ENVS_COLOR_KEYS) and table[0]["self_rgb"].dtype == np.float64


def test_envs_renderer_failure_is_one_line_oserror(monkeypatch):
    from dm_control.mujoco import engine

    def broken(*args, **kwargs):
        raise RuntimeError("no EGL display\n(details)")

    monkeypatch.setattr(engine.Physics, "render", broken)
    with pytest.raises(OSError) as info:
        envs.make_env("cartpole", seed=0)
    message = str(info.value)
    assert "\n" not in message and "apt-get install libegl1 libopengl0 libgl1-mesa-dri" in message
    assert "libosmesa6" in message and "MUJOCO_GL=osmesa" in message


def test_envs_import_only_chooses_renderer():
    code = "import os, sys, envs; print(os.environ.get('MUJOCO_GL'), 'dm_control' in sys.modules)"
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(envs.__file__).parent, check=True)
    clean = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    expected = "egl" if sys.platform.startswith("linux") else "None"
    assert run(env=clean).stdout.split() == [expected, "False"]
    assert run(env=dict(clean, MUJOCO_GL="osmesa")).stdout.split() == ["osmesa", "False"]


# ---- sgqn.py: the SG-SAC mechanisms ----

OBS_SHAPE = (9, 84, 84)
ACTION_DIM = 2


# ---------------------------------------------------------------- oracles and helpers
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other work, OpenMP's spinning threads make these small
    convolutions about 10x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _GuidedReLUFunction(torch.autograd.Function):
    """ReLU whose backward passes max(grad, 0) where its input was positive (guided backprop)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class _GuidedReLU(nn.Module):
    def forward(self, x):
        return _GuidedReLUFunction.apply(x)


def guided_copy(critic):
    """A deep copy of the critic with every nn.ReLU replaced by the guided ReLU; also returns how many."""
    critic = copy.deepcopy(critic)
    replaced = 0
    for module in list(critic.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, _GuidedReLU())
                replaced += 1
    return critic, replaced


def q1_of(net, obs, action):
    return net.q1(torch.cat([net.projection(net.encoder(obs)), action], 1))


def oracle_guided(critic, obs, action):
    """Guided backprop by substituting a custom autograd ReLU (gradient of sum Q1 w.r.t. the raw obs)."""
    guided, replaced = guided_copy(critic)
    x = obs.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q1_of(guided, x, action).sum(), x)
    return grad, replaced


def captum_guided(critic, obs, action):
    """Guided backprop as captum's GuidedBackprop: full backward hooks on each nn.ReLU return relu(grad_input)."""
    handles = [
        m.register_full_backward_hook(lambda module, grad_input, grad_output: (F.relu(grad_input[0]),))
        for m in critic.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        x = obs.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(q1_of(critic, x, action).sum(), x)
    finally:
        for h in handles:
            h.remove()
    return grad


def plain_gradient(critic, obs, action):
    x = obs.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q1_of(critic, x, action).sum(), x)
    return grad


def authors_mask(attribution, rho):
    """SGQN's compute_attribution_mask (DMC/src/algorithms/rl_utils.py)."""
    masks = []
    for i in range(0, attribution.shape[1], 3):
        a = attribution[:, i : i + 3].abs().max(dim=1)[0]
        q = torch.quantile(a.flatten(1), rho, 1)
        masks.append((a >= q[:, None, None]).unsqueeze(1).repeat(1, 3, 1, 1))
    return torch.cat(masks, dim=1).float()


def assert_no_hooks(*roots):
    for root in roots:
        for m in root.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, m
            assert not m._backward_hooks and not m._backward_pre_hooks, m
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_backward_hooks


def perturb(module, seed, scale=0.05):
    """Add noise to every conv weight and bias (at the delta-orthogonal init only a 21x21 input grid is seen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.01 * torch.randn(m.bias.shape, generator=g))


def make_critic(seed=0, hidden=64, noise=True):
    torch.manual_seed(seed)
    critic = sgqn.Critic(sgqn.Encoder(OBS_SHAPE, 11, 32), ACTION_DIM, 100, hidden)
    if noise:
        perturb(critic, seed + 1)
    return critic


def random_obs(b, seed, shape=OBS_SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, *shape), generator=g).float(), torch.rand(b, ACTION_DIM, generator=g) * 2 - 1


def ref_actor(actor, features, log_std_min=-10.0, log_std_max=2.0):
    """The authors' actor (DMC-GB): trunk -> mean, log_std squashed into bounds, gaussian_logprob, squash."""
    mean, log_std = actor.trunk(actor.projection(features.detach())).chunk(2, dim=-1)
    log_std = torch.tanh(log_std)
    log_std = log_std_min + 0.5 * (log_std_max - log_std_min) * (log_std + 1)
    noise = torch.randn_like(mean)
    pi = mean + noise * log_std.exp()
    log_pi = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True) - 0.5 * math.log(2 * math.pi) * noise.size(-1)
    mu, pi = torch.tanh(mean), torch.tanh(pi)
    log_pi = log_pi - torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return mu, pi, log_pi, mean, log_std


def conv_weights(agent):
    return [p.detach().clone() for p in agent.critic.encoder.parameters()]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 1. guided backprop
def test_guided_backprop_matches_custom_autograd_and_captum_oracles():
    critic = make_critic(seed=0, hidden=64)
    obs, action = random_obs(4, seed=1)
    got = sgqn.guided_backprop(critic, obs, action)
    want, replaced = oracle_guided(critic, obs, action)
    assert replaced == 14  # 10 conv ReLUs + 2 per Q head
    assert got.shape == obs.shape and got.dtype == obs.dtype
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(got, captum_guided(critic, obs, action), rtol=1e-5, atol=1e-6 * scale)
    # guided differs from the plain gradient, and perturbed weights give attribution beyond the 21x21 grid
    plain = plain_gradient(critic, obs, action)
    assert (plain - want).abs().max() > 0.1 * scale
    assert ((got != 0).float().sum((2, 3)) > 21 * 21).all()
    # nothing left behind
    assert_no_hooks(critic)
    assert all(p.grad is None for p in critic.parameters())


def test_guided_backprop_at_init_only_sees_the_21x21_grid():
    critic = make_critic(seed=3, hidden=64, noise=False)
    obs, action = random_obs(2, seed=4)
    got = sgqn.guided_backprop(critic, obs, action)
    grid = torch.zeros(84, 84, dtype=torch.bool)
    grid[21:62:2, 21:62:2] = True  # centre taps: stride-2 conv then 10 convs of offset 1
    assert (got[..., ~grid] == 0).all()
    assert (got[..., 83, :] == 0).all() and (got[..., :, 83] == 0).all()
    assert (got[..., grid] != 0).any()
    torch.testing.assert_close(got, oracle_guided(critic, obs, action)[0], rtol=1e-5, atol=1e-12)


class _TinyCritic(nn.Module):
    """x (2) -> Linear(3) -> ReLU = encoder; identity projection; q1 = Linear(4, 2) -> ReLU -> Linear(1)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU())
        self.projection = nn.Identity()
        self.q1 = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        with torch.no_grad():
            self.encoder[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]]))
            self.q1[0].weight.copy_(torch.tensor([[-1.0, 2.0, 0.5, 0.0], [1.0, 0.0, -1.0, 1.0]]))
            self.q1[2].weight.copy_(torch.tensor([[-1.0, 4.0]]))
        self.double()


def test_guided_backprop_hand_checked_example():
    # sample 0: x = (2, 3), a = 1: encoder pre-activations (5, -1, 4), h = (5, 0, 4); head pre-activations (-3, 2),
    #   q = 8. Plain: dh = 4 * (1, 0, -1) -> masked (4, 0, -4) -> dx = 4*(1,1) - 4*(2,0) = (-4, 4).
    #   Guided: the -4 arriving at the positive pre-activation 4 is zeroed -> dx = 4*(1,1) = (4, 4).
    # sample 1: x = (1, -2), a = 0.5: pre (-1, 3, 2), head pre (7, -1.5), q = -7. Plain: dz = (-1, 0),
    #   dh = (1, -2, -0.5) -> masked (0, -2, -0.5) -> dx = (-3, 2). Guided: the -1 at the head's ReLU is zeroed: (0, 0).
    critic = _TinyCritic()
    obs = torch.tensor([[2.0, 3.0], [1.0, -2.0]], dtype=torch.float64)
    action = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    plain = plain_gradient(critic, obs, action)
    assert torch.equal(plain, torch.tensor([[-4.0, 4.0], [-3.0, 2.0]], dtype=torch.float64))  # hand computation is right
    got = sgqn.guided_backprop(critic, obs, action)
    assert torch.equal(got, torch.tensor([[4.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    assert_no_hooks(critic)
    assert all(p.grad is None for p in critic.parameters())


# ---------------------------------------------------------------- 2. shared forward
def test_guided_relus_shared_forward_then_ordinary_backward():
    critic = make_critic(seed=5, hidden=64)
    obs, action = random_obs(4, seed=6)
    params = list(critic.parameters())
    x = obs.clone().requires_grad_(True)
    with sgqn.guided_relus(critic):
        features = critic.encoder(x)
        q1, q2 = critic.heads(features, action)
        (attribution,) = torch.autograd.grad(q1.sum(), x, retain_graph=True)
    assert_no_hooks(critic)
    # the attribution taken inside the block is the guided one
    want, _ = oracle_guided(critic, obs, action)
    torch.testing.assert_close(attribution, want, rtol=1e-5, atol=1e-6 * want.abs().max())
    # a backward through the same graph after the block is ordinary
    target = torch.linspace(-1, 1, len(obs))[:, None]
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    got = torch.autograd.grad(loss, [x] + params)
    x2 = obs.clone().requires_grad_(True)
    h = torch.cat([critic.projection(critic.encoder(x2)), action], 1)
    loss2 = F.mse_loss(critic.q1(h), target) + F.mse_loss(critic.q2(h), target)
    expected = torch.autograd.grad(loss2, [x2] + params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * e.abs().max() + 1e-12)
    # and differs from what a guided backward of that loss would give (the check can fail)
    guided, _ = guided_copy(critic)
    x3 = obs.clone().requires_grad_(True)
    h3 = torch.cat([guided.projection(guided.encoder(x3)), action], 1)
    (g3,) = torch.autograd.grad(F.mse_loss(guided.q1(h3), target) + F.mse_loss(guided.q2(h3), target), x3)
    assert (g3 - expected[0]).abs().max() > 0.01 * expected[0].abs().max()


# ---------------------------------------------------------------- 3. saliency mask
@pytest.mark.parametrize("rho", [0.5, 0.9, 0.95, 0.98])
def test_saliency_mask_tie_free_counts_and_channels(rho):
    g = torch.Generator().manual_seed(int(rho * 100))
    attribution = torch.randn(5, 9, 84, 84, generator=g, dtype=torch.float64)
    mask = sgqn.saliency_mask(attribution, rho)
    assert mask.shape == attribution.shape and mask.dtype.is_floating_point
    assert ((mask == 0) | (mask == 1)).all()
    frames = mask.view(5, 3, 3, 84, 84)
    assert (frames == frames[:, :, :1]).all()  # identical over a frame's 3 channels
    kept = frames[:, :, 0].sum((2, 3))
    target = (1 - rho) * 7056
    assert ((kept == math.floor(target)) | (kept == math.ceil(target))).all()
    if rho == 0.98:
        assert (kept == 142).all()  # as the authors' code
    assert torch.equal(mask, authors_mask(attribution, rho))


def _tie_maps():
    g = torch.Generator().manual_seed(11)
    b = 4
    mostly_zero = torch.zeros(b, 9, 84, 84)
    idx = torch.randint(0, 9 * 84 * 84, (b, 300), generator=g)
    mostly_zero.view(b, -1).scatter_(1, idx, torch.randn(b, 300, generator=g))
    few_nonzero = torch.zeros(b, 9, 84, 84)
    idx = torch.randint(0, 9 * 84 * 84, (b, 60), generator=g)
    few_nonzero.view(b, -1).scatter_(1, idx, torch.rand(b, 60, generator=g) + 0.5)
    integers = torch.randint(-4, 5, (b, 9, 84, 84), generator=g).float()
    sparse_integers = torch.randint(-3, 4, (b, 9, 84, 84), generator=g).float() * (torch.rand(b, 9, 84, 84, generator=g) < 0.05)
    constant = torch.full((b, 9, 84, 84), 0.25)
    float32 = torch.randn(b, 9, 84, 84, generator=g)
    channels_last = torch.randn(b, 9, 84, 84, generator=g).contiguous(memory_format=torch.channels_last)
    return dict(mostly_zero=mostly_zero, few_nonzero=few_nonzero, integers=integers, sparse_integers=sparse_integers,
                constant=constant, float32=float32, channels_last=channels_last, float64=float32.double())


def _ulp_gap_maps(rho, ulps, dtype):
    """Frames whose two order statistics at torch.quantile's rank are `ulps` ulp apart: there the interpolated
    threshold rounds to one of them, so `>=` keeps or drops every value equal to the upper one."""
    g = torch.Generator().manual_seed(ulps)
    per_frame = torch.rand(4, 3, 84 * 84, generator=g, dtype=dtype).sort(-1).values  # (B, k, n) ascending
    below = int(torch.tensor(rho, dtype=dtype) * (84 * 84 - 1))
    upper = per_frame[..., below]
    for _ in range(ulps):
        upper = torch.nextafter(upper, torch.tensor(2.0, dtype=dtype))
    per_frame[..., below + 1] = upper
    per_frame = per_frame[..., torch.randperm(84 * 84, generator=g)].view(4, 3, 1, 84, 84)
    return per_frame * torch.tensor([1.0, -0.5, 0.25], dtype=dtype).view(1, 1, 3, 1, 1)  # max |.| over RGB: channel 0


RHOS = [0.3, 0.5, 0.9, 0.95, 0.98, 0.99]


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("kind", list(_tie_maps()))
def test_saliency_mask_equals_authors_formula(kind, rho):
    attribution = _tie_maps()[kind]
    assert torch.equal(sgqn.saliency_mask(attribution, rho), authors_mask(attribution, rho))


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saliency_mask_equals_authors_formula_at_one_and_two_ulp_gaps(rho, dtype):
    for ulps in (1, 2):
        attribution = _ulp_gap_maps(rho, ulps, dtype).reshape(4, 9, 84, 84)
        assert torch.equal(sgqn.saliency_mask(attribution, rho), authors_mask(attribution, rho)), ulps


def test_saliency_mask_uses_max_over_channels_of_abs():
    attribution = torch.zeros(1, 9, 84, 84)
    attribution[0, 1, 10, 10] = -5.0  # negative, in the middle channel of frame 0
    attribution[0, 5, 20, 30] = 3.0  # last channel of frame 1
    mask = sgqn.saliency_mask(attribution, 0.99999)
    assert mask[0, 0:3, 10, 10].eq(1).all() and mask[0, 0:3].sum() == 3
    assert mask[0, 3:6, 20, 30].eq(1).all() and mask[0, 3:6].sum() == 3
    assert mask[0, 6:9].eq(1).all()  # an all-zero frame: every pixel ties at the quantile


# ---------------------------------------------------------------- 4. masked observation
def test_mask_observation_keeps_salient_pixels_and_one_fill():
    g = torch.Generator().manual_seed(2)
    obs = 30 + torch.rand(6, 9, 84, 84, generator=g) * 170  # values in [30, 200]
    mask = sgqn.saliency_mask(torch.randn(6, 9, 84, 84, generator=g), 0.9)
    torch.manual_seed(0)
    out = sgqn.mask_observation(obs, mask)
    keep = mask == 1
    assert torch.equal(out[keep], obs[keep])
    fills = out[~keep].unique()
    assert fills.numel() == 1
    assert obs.min() <= fills.item() <= obs.max()
    # the fill is drawn from torch's RNG, one uniform scalar in [min, max] (the reference update relies on this)
    torch.manual_seed(0)
    u = torch.rand(())
    assert fills.item() == pytest.approx((obs.min() + u * (obs.max() - obs.min())).item(), rel=1e-6)
    torch.manual_seed(1)
    assert sgqn.mask_observation(obs, mask)[~keep].unique().item() != fills.item()


# ---------------------------------------------------------------- 5. augmentations
def test_random_shift_pad_zero_is_identity():
    x = torch.randint(0, 256, (3, 9, 10, 12), dtype=torch.uint8)
    out = sgqn.random_shift(x, 0)
    assert out.dtype == x.dtype and torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_shift_is_replicate_pad_and_crop(dtype):
    torch.manual_seed(0)
    pad, b, h, w = 4, 64, 14, 17  # h != w catches swapped axes
    x = torch.randint(0, 256, (b, 6, h, w)).to(dtype)
    if dtype.is_floating_point:
        x = x + torch.rand(x.shape)
    out = sgqn.random_shift(x, pad)
    assert out.dtype == dtype and out.shape == x.shape
    padded = F.pad(x.double(), (pad, pad, pad, pad), mode="replicate")
    offsets = set()
    for i in range(b):
        found = [(oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
                 if torch.equal(padded[i, :, oy : oy + h, ox : ox + w], out[i].double())]
        assert len(found) == 1, i
        offsets.add(found[0])
    ys, xs = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert len(offsets) > 20 and min(ys) == 0 and min(xs) == 0 and max(ys) == 2 * pad and max(xs) == 2 * pad


def test_random_overlay():
    g = torch.Generator().manual_seed(3)
    b, n, h, w = 32, 4, 8, 10
    x = torch.rand(b, 9, h, w, generator=g) * 255
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    assert torch.equal(sgqn.random_overlay(x, images, 0.0), x)
    candidates = torch.cat([images, images.flip(-1)]).float()  # (2n, 3, h, w): index >= n means flipped
    picks = []
    for alpha in (1.0, 0.5):
        torch.manual_seed(7)
        out = sgqn.random_overlay(x, images, alpha)
        assert out.shape == x.shape and out.dtype == x.dtype
        chosen = []
        for i in range(b):
            want = (1 - alpha) * x[i] + alpha * candidates.repeat(1, 3, 1, 1)  # (2n, 9, h, w)
            err = (want - out[i]).abs().amax((1, 2, 3))
            assert err.min() == 0 if alpha == 1.0 else err.min() < 1e-4
            chosen.append(int(err.argmin()))
        picks.append(chosen)
    assert picks[0] == picks[1]  # same seed, same picks
    assert any(c >= n for c in picks[0]) and any(c < n for c in picks[0])  # flipped and not flipped both occur
    assert len({c % n for c in picks[0]}) == n


# ---------------------------------------------------------------- 6. upsampling conv and decoder
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (3, 4, 6, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upsample_conv_equals_interpolate_then_conv(shape, dtype):
    torch.manual_seed(sum(shape))
    b, c, h, w = shape
    conv = nn.Conv2d(c, 6, 3, padding=1).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    upstream = torch.randn(b, 6, 2 * h, 2 * w, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)

    got = sgqn.upsample_conv(x, conv)
    got_grads = torch.autograd.grad((got * upstream).sum(), [x, conv.weight, conv.bias])
    want = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    want_grads = torch.autograd.grad((want * upstream).sum(), [x, conv.weight, conv.bias])
    assert got.shape == want.shape == (b, 6, 2 * h, 2 * w)
    torch.testing.assert_close(got, want, **tol)
    for g_, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g_, w_, **tol)


def test_decoder_shapes_and_plain_equivalence():
    encoder = sgqn.Encoder(OBS_SHAPE, 11, 32)
    assert encoder.out_shape == (32, 21, 21) and encoder.out_dim == 14112
    torch.manual_seed(0)
    dec = sgqn.AttributionDecoder(encoder.out_shape, OBS_SHAPE, ACTION_DIM, 100)
    assert (dec.linear.in_features, dec.linear.out_features) == (102, 14112)
    for conv, (cin, cout) in zip((dec.conv1, dec.conv2, dec.conv3), ((32, 128), (128, 64), (64, 9))):
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.stride) == (cin, cout, (3, 3), (1, 1), (1, 1))
    projected, action = torch.randn(3, 100), torch.rand(3, ACTION_DIM)
    out = dec(projected, action)
    assert out.shape == (3, 9, 84, 84)
    # the authors' AttributionDecoder.forward
    x = F.relu(dec.linear(torch.cat([projected, action], 1)).view(-1, 32, 21, 21))
    x = F.relu(F.interpolate(dec.conv1(x), scale_factor=2, mode="nearest"))
    x = F.relu(F.interpolate(dec.conv2(x), scale_factor=2, mode="nearest"))
    torch.testing.assert_close(out, dec.conv3(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 7. networks
def test_encoder_structure():
    encoder = sgqn.Encoder(OBS_SHAPE, 11, 32)
    layers = list(encoder.convs)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    relus = [m for m in layers if isinstance(m, nn.ReLU)]
    assert len(convs) == 11 and len(relus) == 10 and len(layers) == 21
    assert isinstance(layers[-1], nn.Conv2d) and isinstance(layers[0], nn.Conv2d)
    assert all(isinstance(m, nn.ReLU) for m in layers[1::2]) and all(isinstance(m, nn.Conv2d) for m in layers[0::2])
    assert all(not r.inplace for r in relus)
    assert convs[0].stride == (2, 2) and all(c.stride == (1, 1) for c in convs[1:])
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) and c.out_channels == 32 for c in convs)
    assert convs[0].in_channels == 9
    obs = torch.rand(2, *OBS_SHAPE) * 255
    assert encoder(obs).shape == (2, 14112)
    # the encoder divides by 255 and the last conv has no ReLU (some outputs are negative)
    torch.testing.assert_close(encoder(obs), encoder.convs(obs / 255).flatten(1))
    assert (encoder(obs) < 0).any()


def test_critic_structure_and_init():
    torch.manual_seed(0)
    critic = sgqn.Critic(sgqn.Encoder(OBS_SHAPE, 11, 32), ACTION_DIM, 100, 1024)
    relus = [m for m in critic.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 14 and not any(r.inplace for r in relus)
    for m in critic.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            centre = w[:, :, 1, 1]
            off = w.clone()
            off[:, :, 1, 1] = 0
            assert (off == 0).all() and (m.bias == 0).all()
            gram = centre.T @ centre if centre.shape[0] >= centre.shape[1] else centre @ centre.T
            torch.testing.assert_close(gram, 2.0 * torch.eye(len(gram)), rtol=0, atol=1e-4)  # relu gain sqrt(2)
        elif isinstance(m, nn.Linear):
            w = m.weight.detach()
            gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            torch.testing.assert_close(gram, torch.eye(len(gram)), rtol=0, atol=1e-4)
            assert (m.bias == 0).all()
    assert isinstance(critic.projection[1], nn.LayerNorm) and isinstance(critic.projection[2], nn.Tanh)
    assert critic.projection[0].in_features == 14112 and critic.projection[0].out_features == 100
    assert critic.q1[0].in_features == 100 + ACTION_DIM and critic.q1[0].out_features == 1024


def test_actor_outputs_and_log_prob():
    torch.manual_seed(0)
    actor = sgqn.Actor(14112, ACTION_DIM, 100, 1024)
    features = torch.randn(16, 14112)
    torch.manual_seed(5)
    mu, pi, log_prob = actor(features)
    torch.manual_seed(5)
    r_mu, r_pi, r_log_prob, mean, log_std = ref_actor(actor, features)
    assert mu.shape == pi.shape == (16, ACTION_DIM) and log_prob.shape == (16, 1)
    assert (mu.abs() < 1).all() and (pi.abs() < 1).all()
    torch.testing.assert_close(mu, r_mu)
    torch.testing.assert_close(pi, r_pi)
    torch.testing.assert_close(log_prob, r_log_prob, rtol=1e-5, atol=1e-4)
    # independent: Normal + TanhTransform on the pre-tanh sample (the authors' +1e-6 moves the log by < 1e-6/(1-pi^2))
    torch.manual_seed(5)
    noise = torch.randn(16, ACTION_DIM)
    u = (mean + noise * log_std.exp()).detach().double()
    std = log_std.exp().detach().double()
    base = torch.distributions.Normal(mean.detach().double(), std)
    tanh = torch.distributions.transforms.TanhTransform()
    lp = (base.log_prob(u) - tanh.log_abs_det_jacobian(u, torch.tanh(u))).sum(-1, keepdim=True)
    slack = (1e-6 / (1 - torch.tanh(u) ** 2)).sum(-1, keepdim=True)
    assert (u.abs() < 4).all()
    assert ((log_prob.double() - lp).abs() <= slack * 1.01 + 1e-3).all()


def test_actor_log_std_bounds():
    torch.manual_seed(1)
    actor = sgqn.Actor(64, ACTION_DIM, 16, 32)
    with torch.no_grad():
        actor.trunk[-1].weight.mul_(1e4)  # saturate the tanh of log_std at both ends
    features = torch.randn(32, 64)
    raw = actor.trunk(actor.projection(features))[:, ACTION_DIM:]
    assert (raw > 20).any() and (raw < -20).any()
    torch.manual_seed(2)
    mu, pi, log_prob = actor(features)
    torch.manual_seed(2)
    _, r_pi, r_log_prob, _, log_std = ref_actor(actor, features)
    assert (log_std >= -10).all() and (log_std <= 2).all()
    assert (log_std == 2).any() and (log_std == -10).any()
    torch.testing.assert_close(pi, r_pi)
    torch.testing.assert_close(log_prob, r_log_prob, rtol=1e-5, atol=1e-3)
    assert (mu.abs() <= 1).all() and (pi.abs() <= 1).all() and torch.isfinite(log_prob).all()


# ---------------------------------------------------------------- 8. update
def make_agent(seed=0, **overrides):
    args = sgqn.Args(**overrides)
    torch.manual_seed(seed)
    agent = sgqn.make_agent(OBS_SHAPE, ACTION_DIM, args, torch.device("cpu"))
    perturb(agent.critic.encoder, seed + 100)
    agent.critic_target.load_state_dict(agent.critic.state_dict())
    return agent, args


def make_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (b, *OBS_SHAPE), generator=g).float()
    next_obs = torch.randint(0, 256, (b, *OBS_SHAPE), generator=g).float()
    action = torch.rand(b, ACTION_DIM, generator=g) * 2 - 1
    reward = torch.rand(b, 1, generator=g)
    overlay = torch.randint(0, 256, (5, 3, 84, 84), generator=g, dtype=torch.uint8)
    return (obs, action, reward, next_obs), overlay


def test_update_actor_step_leaves_convs_critic_and_aux_steps_move_them():
    batch, overlay = make_batch()
    # actor step only: critic lr 0, no consistency, no aux
    agent, args = make_agent(critic_lr=0.0, actor_update_freq=1, consistency_coef=0.0, aux_update_freq=0)
    convs, critic_before, actor_before = conv_weights(agent), snapshot(agent.critic), snapshot(agent.actor)
    alpha_before = agent.log_alpha.item()
    losses = sgqn.update(agent, batch, 1, args, overlay)
    assert "actor" in losses and "aux" not in losses
    assert all(torch.equal(a, b) for a, b in zip(convs, conv_weights(agent)))
    assert same(critic_before, snapshot(agent.critic))
    assert not same(actor_before, snapshot(agent.actor)) and agent.log_alpha.item() != alpha_before
    # critic step only (odd step, actor every 2): convs move, actor does not
    agent, args = make_agent(actor_update_freq=2, aux_update_freq=0)
    convs, actor_before, target_before = conv_weights(agent), snapshot(agent.actor), snapshot(agent.critic_target)
    losses = sgqn.update(agent, batch, 1, args, overlay)
    assert set(losses) == {"td", "q", "consistency"}
    assert all(not torch.equal(a, b) for a, b in zip(convs, conv_weights(agent)))
    assert same(actor_before, snapshot(agent.actor)) and same(target_before, snapshot(agent.critic_target))
    # aux step only: critic lr 0, convs, critic projection and decoder move; Q heads do not
    agent, args = make_agent(critic_lr=0.0, actor_update_freq=100, consistency_coef=0.0, aux_update_freq=1)
    convs, dec_before = conv_weights(agent), snapshot(agent.decoder)
    q_before, proj_before = snapshot(agent.critic.q1), snapshot(agent.critic.projection)
    losses = sgqn.update(agent, batch, 1, args, overlay)
    assert "aux" in losses and "actor" not in losses
    assert all(not torch.equal(a, b) for a, b in zip(convs, conv_weights(agent)))
    assert not same(dec_before, snapshot(agent.decoder)) and not same(proj_before, snapshot(agent.critic.projection))
    assert same(q_before, snapshot(agent.critic.q1))


@pytest.mark.parametrize("tau", [0.0, 1.0, None])
def test_update_polyak(tau):
    batch, overlay = make_batch(b=4)
    taus = dict(encoder_tau=tau, critic_tau=tau) if tau is not None else dict(encoder_tau=0.05, critic_tau=0.01)
    agent, args = make_agent(actor_update_freq=1, aux_update_freq=0, **taus)
    with torch.no_grad():  # make target and online differ
        for p in agent.critic_target.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    target_before = snapshot(agent.critic_target)
    sgqn.update(agent, batch, 1, args, overlay)
    online, target = snapshot(agent.critic), snapshot(agent.critic_target)
    assert not same(online, target_before)
    for k in target:
        if tau == 1.0:
            assert torch.equal(target[k], online[k]), k
        elif tau == 0.0:
            assert torch.equal(target[k], target_before[k]), k
        else:
            t = 0.05 if k.startswith(("encoder.", "projection.")) else 0.01
            assert k.startswith(("encoder.", "projection.", "q1.", "q2."))
            torch.testing.assert_close(target[k], target_before[k] + t * (online[k] - target_before[k]), rtol=1e-5, atol=1e-6)
    # target has its own parameters
    assert not {id(p) for p in agent.critic.parameters()} & {id(p) for p in agent.critic_target.parameters()}


def test_update_no_hooks_finite_losses_channels_last_batch():
    (obs, action, reward, next_obs), overlay = make_batch(b=4)
    torch.manual_seed(0)  # batches from random_shift are channels-last views, as in main()
    obs = sgqn.random_shift(obs.to(torch.uint8), 4).float()
    next_obs = sgqn.random_shift(next_obs.to(torch.uint8), 4).float()
    agent, args = make_agent(actor_update_freq=2, aux_update_freq=2)
    for step in (1, 2):
        losses = sgqn.update(agent, (obs, action, reward, next_obs), step, args, overlay)
        assert all(torch.isfinite(v).all() for v in losses.values())
    assert set(losses) == {"td", "q", "consistency", "actor", "alpha_loss", "alpha", "aux"}
    assert losses["consistency"] > 0
    assert_no_hooks(agent.critic, agent.critic_target, agent.actor, agent.decoder)


@pytest.mark.parametrize("switches", [{}, dict(consistency_coef=0.0), dict(aux_update_freq=0),
                                      dict(consistency_coef=0.0, aux_update_freq=0)])
def test_update_runs_on_meta_device(switches):
    """The meta device stands in for CUDA: a tensor made without device= lands on the CPU and cannot mix with meta
    tensors, and .item(), .cpu(), .numpy() or bool() of a meta tensor fail, as a host synchronisation would."""
    meta = torch.device("meta")
    args = sgqn.Args(**switches)
    agent = sgqn.make_agent(OBS_SHAPE, ACTION_DIM, args, meta)
    overlay = envs.procedural_images(4, 84, torch.Generator().manual_seed(0)).to(meta)
    frames = torch.empty(2, 4, *OBS_SHAPE, dtype=torch.uint8, device=meta)
    obs, next_obs = (sgqn.random_shift(f, args.shift_pad).float() for f in frames)
    batch = (obs, torch.empty(4, ACTION_DIM, device=meta), torch.empty(4, 1, device=meta), next_obs)
    for step in (1, 2):
        losses = sgqn.update(agent, batch, step, args, overlay)
        assert losses and all(v.device == meta for v in losses.values())
    attribution = sgqn.guided_backprop(agent.critic, obs, batch[1])
    mask = sgqn.saliency_mask(attribution, args.rho)
    outputs = [obs, attribution, mask, sgqn.mask_observation(obs, mask), sgqn.random_overlay(obs, overlay, 0.5),
               agent.decoder(torch.empty(4, args.projection_dim, device=meta), batch[1])]
    assert all(x.device == meta and x.shape[1:] == OBS_SHAPE for x in outputs)


@pytest.mark.parametrize("switches, budget", [({}, 730), (dict(consistency_coef=0.0, aux_update_freq=0), 400)])
def test_update_dispatches_few_operations(switches, budget):
    """Operations dispatched per update, counted as benchmarks/bench_update.py reports them; deterministic, so a
    change that adds operations (a per-parameter loop, an unfused optimiser) fails here. 514.5 (SG-SAC) and 260
    (SAC) when this test was written, 1054 and 647.5 with Adam unfused."""
    spec = importlib.util.spec_from_file_location("bench_update", ROOT / "benchmarks" / "bench_update.py")
    bench_update = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_update)
    assert bench_update.count_operations(switches, torch.device("cpu")) <= budget


# ---------------------------------------------------------------- 9. plain reference step
def _q_values(net, obs, action):
    h = torch.cat([net.projection(net.encoder(obs)), action], 1)
    return net.q1(h), net.q2(h)


def _plain_decoder(dec, projected, action):
    x = F.relu(dec.linear(torch.cat([projected, action], 1)).view(-1, *dec.encoder_shape))
    x = dec.conv1(x)
    x = F.relu(F.interpolate(x, scale_factor=2, mode="nearest"))
    x = dec.conv2(x)
    x = F.relu(F.interpolate(x, scale_factor=2, mode="nearest"))
    return dec.conv3(x)


def reference_update(agent, batch, step, args, overlay):
    """The SG-SAC step written plainly, as the authors' code, with sgqn's documented differences: one attribution
    (before the critic step) serves both the consistency mask and the aux target; the actor uses conv features of
    obs computed before the critic step. torch's RNG is consumed in sgqn.update's order."""
    obs, action, reward, next_obs = batch
    critic, critic_target, actor, decoder, log_alpha = agent.critic, agent.critic_target, agent.actor, agent.decoder, agent.log_alpha
    aux_step = args.aux_update_freq > 0 and step % args.aux_update_freq == 0
    losses = {}
    if args.consistency_coef > 0 or aux_step:
        mask = authors_mask(captum_guided(critic, obs, action), args.rho)
    conv_features = critic.encoder(obs).detach()  # before the critic step

    with torch.no_grad():
        _, next_pi, next_log_pi, _, _ = ref_actor(actor, critic.encoder(next_obs))
        target_q1, target_q2 = _q_values(critic_target, next_obs, next_pi)
        target_v = torch.min(target_q1, target_q2) - log_alpha.exp().detach() * next_log_pi
        target_q = reward + args.gamma * target_v
    q1, q2 = _q_values(critic, obs, action)
    td = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
    consistency = torch.zeros((), device=obs.device)
    if args.consistency_coef > 0:
        lo, hi = obs.min(), obs.max()
        fill = lo + torch.rand((), device=obs.device) * (hi - lo)
        masked = obs * mask
        masked[mask < 1] = fill
        masked_q1, masked_q2 = _q_values(critic, masked, action)
        consistency = F.mse_loss(q1, masked_q1) + F.mse_loss(q2, masked_q2)
    losses["td"], losses["q"], losses["consistency"] = td, q1.mean(), consistency
    critic_loss = td + args.consistency_coef * consistency
    agent.critic_optimizer.zero_grad()
    critic_loss.backward()
    agent.critic_optimizer.step()

    if step % args.actor_update_freq == 0:
        _, pi, log_pi, _, _ = ref_actor(actor, conv_features)
        h = torch.cat([critic.projection(conv_features), pi], 1)
        actor_q = torch.min(critic.q1(h), critic.q2(h))
        actor_loss = (log_alpha.exp().detach() * log_pi - actor_q).mean()
        agent.actor_optimizer.zero_grad()
        actor_loss.backward()
        agent.actor_optimizer.step()
        alpha_loss = (log_alpha.exp() * (-log_pi - (-pi.shape[1])).detach()).mean()
        agent.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        agent.alpha_optimizer.step()
        losses.update(actor=actor_loss, alpha_loss=alpha_loss, alpha=log_alpha.exp())
        for part, tau in (("encoder", args.encoder_tau), ("projection", args.encoder_tau), ("q1", args.critic_tau), ("q2", args.critic_tau)):
            for p, t in zip(getattr(critic, part).parameters(), getattr(critic_target, part).parameters()):
                t.data.copy_(tau * p.data + (1 - tau) * t.data)

    if aux_step:
        b = len(obs)
        picked = overlay[torch.randint(len(overlay), (b,), device=obs.device)]
        flip = torch.rand(b, 1, 1, 1, device=obs.device) < 0.5
        picked = torch.where(flip, picked.flip(-1), picked).float()
        overlaid = (1 - args.overlay_alpha) * obs + args.overlay_alpha * picked.repeat(1, obs.shape[1] // 3, 1, 1)
        logits = _plain_decoder(decoder, critic.projection(critic.encoder(overlaid)), action)
        aux_loss = F.binary_cross_entropy_with_logits(logits, mask)
        agent.aux_optimizer.zero_grad()
        aux_loss.backward()
        agent.aux_optimizer.step()
        losses["aux"] = aux_loss
    return {k: v.detach() for k, v in losses.items()}


def _compare_with_reference(dtype, batch_seed, **config):
    """Two identical agents; 2 steps of sgqn.update on one and of reference_update on the other, from the same seeds.
    Step 1: critic only (actor, target, aux every 2 steps by default); step 2: critic, actor, temperature, target, aux."""
    batch, overlay = make_batch(b=8, seed=batch_seed)
    batch = tuple(x.to(dtype) for x in batch)
    # narrower than the paper's networks (16 filters, not 32; 256 hidden units, not 1024): the same code at a
    # fraction of the time that float64 convolutions and orthogonal inits take
    small = dict(num_filters=16, hidden_dim=256)
    fast, args = make_agent(seed=9, actor_update_freq=2, **small, **{"aux_update_freq": 2, **config})
    plain, _ = make_agent(seed=9, **small)
    for agent in (fast, plain):
        for module in (agent.critic, agent.critic_target, agent.actor, agent.decoder):
            module.to(dtype)  # in place: the optimizers keep the same parameters
        agent.log_alpha.data = agent.log_alpha.data.to(dtype)
    assert same(snapshot(fast.critic), snapshot(plain.critic))
    for step in (1, 2):
        torch.manual_seed(1000 + step)
        got = sgqn.update(fast, batch, step, args, overlay)
        state_fast = torch.get_rng_state()
        torch.manual_seed(1000 + step)
        want = reference_update(plain, batch, step, args, overlay)
        assert torch.equal(state_fast, torch.get_rng_state())  # same RNG consumption
        assert set(got) == set(want), step
        for k in want:
            torch.testing.assert_close(got[k].detach().double(), want[k].double(), rtol=1e-4, atol=1e-7, msg=f"step {step} loss {k}")
    assert {"td", "q", "consistency", "actor", "alpha_loss", "alpha", "aux"} == set(got)
    assert_no_hooks(fast.critic, fast.critic_target, fast.actor, fast.decoder)
    # the comparison is not vacuous: encoder and decoder moved
    start, _ = make_agent(seed=9, **small)
    assert not same(snapshot(start.critic.encoder), {k: v.float() for k, v in snapshot(fast.critic.encoder).items()})
    assert not same(snapshot(start.decoder), {k: v.float() for k, v in snapshot(fast.decoder).items()})
    return fast, plain


def _assert_params_close(fast, plain, names, atol=1e-5):
    for name in names:
        s_fast, s_plain = snapshot(operator.attrgetter(name)(fast)), snapshot(operator.attrgetter(name)(plain))
        for k in s_plain:
            torch.testing.assert_close(s_fast[k], s_plain[k], rtol=0, atol=atol, msg=f"{name}.{k}")


def test_update_equals_plain_reference_float64():
    # float64, so that float rounding (the decoder's folded upsampling conv computes in another order) is not
    # amplified by Adam's first steps (lr * g / (|g| + eps) flips with the sign of near-zero gradients)
    fast, plain = _compare_with_reference(torch.float64, batch_seed=5)
    _assert_params_close(fast, plain, ["critic", "critic_target", "actor", "decoder"])
    torch.testing.assert_close(fast.log_alpha.detach(), plain.log_alpha.detach(), rtol=0, atol=1e-6)


def test_update_equals_plain_reference_float64_aux_every_step_no_consistency():
    fast, plain = _compare_with_reference(torch.float64, batch_seed=6, consistency_coef=0.0, aux_update_freq=1)
    _assert_params_close(fast, plain, ["critic", "critic_target", "actor", "decoder"], atol=1e-9)


def test_update_equals_plain_reference_float32():
    # the training dtype: every loss, and the parameters that the aux step (whose decoder arithmetic differs in
    # rounding, amplified by Adam into ~lr for near-zero gradients) does not touch
    fast, plain = _compare_with_reference(torch.float32, batch_seed=5)
    _assert_params_close(fast, plain, ["critic.q1", "critic.q2", "critic_target", "actor"])
    torch.testing.assert_close(fast.log_alpha.detach(), plain.log_alpha.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 10. replay buffer
def _frame(ep, t):
    f = np.zeros((3, 4, 4), np.uint8)
    f[0], f[1], f[2] = ep, t, 200 + ep
    return f


def _fill(buffer, lengths, first_episode=0):
    """Episodes of `lengths` transitions; returns the (ep, t) of every frame added, in order."""
    added = []
    for ep, length in enumerate(lengths, start=first_episode):
        buffer.add(_frame(ep, 0), first=True)
        added.append((ep, 0))
        for t in range(1, length + 1):
            buffer.add(_frame(ep, t), np.array([ep, t], np.float32), float(100 * ep + t))
            added.append((ep, t))
    return added


def _check_samples(buffer, n, rng, alive):
    obs, action, reward, next_obs = buffer.sample(n, rng)
    assert obs.dtype == np.uint8 and next_obs.dtype == np.uint8
    assert obs.shape == next_obs.shape == (n, 9, 4, 4) and action.shape == (n, 2) and reward.shape == (n,)
    seen = set()
    for i in range(n):
        ep, t = int(action[i, 0]), int(action[i, 1])
        assert t >= 1 and reward[i] == 100 * ep + t
        want_obs = [max(t - 3, 0), max(t - 2, 0), t - 1]  # stack(t - 1), oldest first
        want_next = [max(t - 2, 0), max(t - 1, 0), t]  # stack(t)
        for stack, want in ((obs[i], want_obs), (next_obs[i], want_next)):
            frames = stack.reshape(3, 3, 4, 4)
            assert (frames[:, 0] == ep).all() and (frames[:, 2] == 200 + ep).all()  # one episode only
            assert [int(f[1, 0, 0]) for f in frames] == want and (frames[:, 1] == np.array(want)[:, None, None]).all()
        assert all((ep, s) in alive for s in range(max(t - 3, 0), t + 1))
        seen.add((ep, t))
    return seen


def test_replay_buffer_stacks_across_episode_boundaries():
    buffer = sgqn.ReplayBuffer(100, (3, 4, 4), 2, frame_stack=3)
    added = _fill(buffer, [5, 1, 2, 7])
    seen = _check_samples(buffer, 2000, np.random.default_rng(0), set(added))
    assert seen == {(ep, t) for ep, t in added if t >= 1}


def test_replay_buffer_wrap_around():
    buffer = sgqn.ReplayBuffer(10, (3, 4, 4), 2, frame_stack=3)
    added = _fill(buffer, [6, 4, 1, 5])  # 7 + 5 + 2 + 6 = 20 frames in a ring of 10
    alive = set(added[-10:])
    seen = _check_samples(buffer, 2000, np.random.default_rng(0), alive)
    valid = {(ep, t) for ep, t in alive if t >= 1 and all((ep, s) in alive for s in range(max(t - 3, 0), t + 1))}
    assert seen == valid and len(valid) >= 4
    # one more wrap, mid-episode
    added += _fill(buffer, [3], first_episode=4)
    buffer.add(_frame(4, 4), np.array([4, 4], np.float32), 404.0)
    added.append((4, 4))
    seen = _check_samples(buffer, 2000, np.random.default_rng(1), set(added[-10:]))
    assert (4, 4) in seen


# ---------------------------------------------------------------- 11. overlay images
def test_procedural_images():
    a = envs.procedural_images(6, 84, torch.Generator().manual_seed(0))
    b = envs.procedural_images(6, 84, torch.Generator().manual_seed(0))
    c = envs.procedural_images(6, 84, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 84, 84)
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = a.flatten(1).float()
    assert (flat.amin(1) <= 5).all() and (flat.amax(1) >= 250).all()
    assert (flat.std(1) > 10).all()
    for i in range(6):
        for j in range(i + 1, 6):
            assert (a[i].float() - a[j].float()).abs().mean() > 5
    assert (a[:, 0] != a[:, 1]).any()  # coloured, not grey
    assert envs.procedural_images(600, 8, torch.Generator().manual_seed(0)).shape == (600, 3, 8, 8)


def test_load_images(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :, 2] = 255  # blue sides
    rgb[:, 10:30] = (255, 0, 0)  # red centre square: the centre crop
    iio.imwrite(tmp_path / "rgb.png", rgb)
    iio.imwrite(tmp_path / "gray.png", np.full((30, 18), 77, np.uint8))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[...] = (10, 20, 30, 128)
    iio.imwrite(tmp_path / "rgba.PNG", rgba)
    (tmp_path / "sub").mkdir()
    iio.imwrite(tmp_path / "sub" / "photo.jpg", np.full((24, 24, 3), (0, 200, 0), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    images = envs.load_images(tmp_path, 10, 12, np.random.default_rng(0))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 12, 12)
    colours = sorted(tuple(int(v) for v in im[:, 6, 6]) for im in images)
    for im in images:
        assert (im == im[:, :1, :1]).all() or tuple(int(v) for v in im[:, 6, 6])[1] > 150  # uniform (jpeg: near)
    assert (10, 20, 30) in colours and (77, 77, 77) in colours and (255, 0, 0) in colours
    green = [c for c in colours if c[1] > 150][0]
    assert max(abs(x - y) for x, y in zip(green, (0, 200, 0))) <= 3
    assert envs.load_images(tmp_path, 2, 12, np.random.default_rng(0)).shape == (2, 3, 12, 12)


def test_load_images_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError) as excinfo:  # the script prints it as one line (test_bad_input_...)
        envs.load_images(tmp_path, 10, 84, np.random.default_rng(0))
    assert "\n" not in str(excinfo.value) and str(tmp_path) in str(excinfo.value)


def test_load_images_grey_alpha_png(tmp_path):
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 90, 255
    iio.imwrite(tmp_path / "la.png", la)
    images = envs.load_images(tmp_path, 1, 8, np.random.default_rng(0))
    assert images.shape == (1, 3, 8, 8) and (images == 90).all()


# ---- sgqn.py, end to end ----
# The real script as a user runs it, with tiny settings: cartpole at action repeat 50 (20-step episodes).

ROOT = Path(__file__).resolve().parent
TINY = "--total-timesteps 10 --learning-starts 8 --batch-size 8 --overlay-images 64 --eval-freq 1000 --eval-episodes 1 --final-eval-episodes 1 --action-repeat 50"
# small networks, a replay buffer smaller than the run, checkpoints amid episodes, a colour and a video test mode
RESUMABLE = ("--env-id cartpole --total-timesteps 60 --learning-starts 24 --batch-size 4 --buffer-size 25 --eval-freq 30 "
             "--checkpoint-freq 7 --eval-episodes 1 --final-eval-episodes 1 --action-repeat 50 --num-filters 8 --hidden-dim 32 "
             "--overlay-images 16 --eval-modes color_hard video_hard")
TIMINGS = {"sps", "elapsed_hours", "eval_seconds"}


def run_script(args, cwd, check=True):
    out = subprocess.run([sys.executable, str(ROOT / "sgqn.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def start_script(args, cwd):
    """sgqn.py in the background, one thread (so that two runs side by side compute alike), stdout unbuffered, on the
    tests' unverified data folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMCGB_VERIFY": "0"}
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "sgqn.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cases(cases, cwd, env=None):
    """Run sgqn.py as a script once per argv, in one Python process (imports paid once): [(exit status, stdout, stderr)]."""
    driver = f"""
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, {str(ROOT)!r})  # as `python sgqn.py` does
out = []
for argv in json.loads(sys.argv[1]):
    sys.argv, stdout, stderr, status = ["sgqn.py", *argv], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path({str(ROOT / "sgqn.py")!r}, run_name="__main__")
        except SystemExit as e:
            status = e.code
        except BaseException:
            traceback.print_exc()
            status = 1
    out.append((status, stdout.getvalue(), stderr.getvalue()))
print(json.dumps(out))
"""
    out = subprocess.run([sys.executable, "-c", driver, json.dumps(cases)], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def assert_one_line_error(status, stdout, stderr, words, expected_status):
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert status == expected_status and "Traceback" not in stderr, (status, stderr)
    assert last.startswith("error:") and all(w in last for w in words), (words, last)
    assert not re.search(r"^step \d", stdout, re.M), "no training step before the error"


def metric_rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in open(run_dir / "metrics.jsonl")]


def readme_commands(prefix):
    """Every command line of the code blocks of README.md (and docs/sweep.md, which it links) that starts with `prefix`."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "sweep.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


@pytest.fixture(scope="module")
def e2e_data_dir(tmp_path_factory):
    """A complete DMC-GB data folder: the real files of ../shared reused cyclically, else synthetic ones."""
    return _envs_make_data_dir(tmp_path_factory.mktemp("e2e_data"), real=ENVS_HAVE_SHARED)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, e2e_data_dir):
    """The same small run twice, side by side: straight through, and interrupted (Ctrl-C once, then SIGKILL at
    several moments, each followed by --resume). -> (straight run folder, interrupted run folder, the Ctrl-C output
    and the updates its checkpoint had still to do)."""
    root = tmp_path_factory.mktemp("resume")
    args = [*RESUMABLE.split(), "--data-dir", str(e2e_data_dir)]
    straight = start_script([*args, "--output-dir", "straight"], root)
    interrupted = start_script([*args, "--output-dir", "cut"], root)
    for line in interrupted.stdout:
        if "24 catch-up updates" in line:
            break
    interrupted.send_signal(signal.SIGINT)  # amid the catch-up: the checkpoint holds a step with updates to do
    (cut,) = (root / "cut").iterdir()
    ctrl_c = interrupted.communicate(timeout=600) + (interrupted.returncode, sgqn.read_checkpoint(cut / "checkpoint.pt")["progress"]["updates_due"])
    for delay in (0.0, 0.7, 1.5):  # after the resumed process writes its first checkpoint
        written = (cut / "checkpoint.pt").stat().st_mtime_ns
        process = start_script(["--resume", str(cut)], root)
        while process.poll() is None and (cut / "checkpoint.pt").stat().st_mtime_ns == written:
            time.sleep(0.01)
        time.sleep(delay)
        process.kill()
        assert process.wait() == -signal.SIGKILL, process.communicate()[1]
    final = start_script(["--resume", str(cut)], root)
    assert final.wait(timeout=600) == 0 and straight.wait(timeout=600) == 0, final.communicate()[1] + straight.communicate()[1]
    (straight_dir,) = (root / "straight").iterdir()
    return straight_dir, cut, ctrl_c


def test_resume_after_interruptions_is_exact(resumed_runs):
    straight, cut, (stdout, stderr, status, pending) = resumed_runs
    assert status == 130 and "Traceback" not in stderr and 0 < pending <= 24  # stopped amid (or before) the catch-up
    assert re.fullmatch(rf"interrupted; the last good checkpoint is step 24; resume with: python sgqn.py --resume "
                        rf"{re.escape(str(cut.relative_to(cut.parent.parent)))}",
                        stderr.strip().splitlines()[-1]), stderr
    rows = metric_rows(straight)
    assert metric_rows(cut) == rows  # every loss, return and evaluation, bit for bit; no row twice
    assert [r["step"] for r in rows if "mode" in r] == [0, 0, 30, 30, 60, 60]
    assert sum("episodic_return" in r for r in rows) == 3 and any("aux" in r for r in rows)
    assert json.loads((cut / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    for name in ("frames", "actions", "rewards", "t"):  # the buffer's files: every frame of the run, once
        assert (cut / "replay" / f"{name}.bin").read_bytes() == (straight / "replay" / f"{name}.bin").read_bytes()
    assert (straight / "replay" / "t.bin").stat().st_size == 8 * (60 + 4)  # 60 steps, 4 resets (the last after step 60)


def test_resume_survives_a_kill_amid_a_checkpoint_write_and_extends(resumed_runs, tmp_path, e2e_data_dir):
    straight, _, _ = resumed_runs
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = (run / "checkpoint.pt").read_bytes()
    pid = os.fork()  # a child that dies once the new checkpoint is written, before it replaces the old one
    if pid == 0:
        try:
            os.replace = lambda *paths: os._exit(9)
            sgqn.atomic_write(run / "checkpoint.pt", b"PK\3\4" + bytes(1000))
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9
    assert (run / "checkpoint.pt").read_bytes() == before
    extend = start_script(["--resume", str(run), "--total-timesteps", "64"], tmp_path)  # the finished run, longer
    stdout, stderr = extend.communicate(timeout=600)
    assert extend.returncode == 0 and "step 60 of 64" in stdout, stderr
    assert json.loads((run / "results.json").read_text())["step"] == 64
    assert sgqn.parse_args(["--resume", str(run)])[0].total_timesteps == 64  # a later plain --resume keeps the extension
    rows = metric_rows(run)
    assert rows[: len(metric_rows(straight))] == metric_rows(straight) and [r["step"] for r in rows if "mode" in r][-2:] == [64, 64]
    out = run_script(["--checkpoint", str(run / "checkpoint.pt"), "--eval-only", "--eval-modes", "color_hard", "--final-eval-episodes",
                      "1", "--data-dir", str(e2e_data_dir), "--output-dir", "evaluated"], tmp_path)  # a resumed run's checkpoint evaluates like any other
    (evaluated,) = (tmp_path / "evaluated").iterdir()
    assert json.loads((evaluated / "results.json").read_text())["step"] == 64, out.stdout


def test_train_then_eval_only(tmp_path, e2e_data_dir):
    """README's main command trains past the seed steps, evaluates every mode and writes its outputs; --eval-only
    reloads the checkpoint with its own settings (and the modes asked for): its returns are those
    of the checkpoint's weights evaluated here on new test envs (the run's own final evaluation came after its
    step-0 one, on later episodes)."""
    main_command = shlex.split("python sgqn.py --env-id cartpole --rho 0.98")[2:]
    out = run_script([*main_command, *TINY.split(), "--data-dir", str(e2e_data_dir), "--output-dir", "runs"], tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("cartpole__sgsac__rho0.98__seed1__")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if "td" in r]
    assert train_rows and all(k in train_rows[-1] for k in ("td", "consistency", "actor", "alpha", "aux", "sps", "frames", "elapsed_hours"))
    assert train_rows[-1]["step"] == 10 and train_rows[-1]["frames"] == 500
    assert {r["mode"] for r in rows if "mode" in r} == set(envs.MODES)
    for mode in envs.MODES:  # a line per mode and evaluation, as soon as the mode is done
        assert re.search(rf"^evaluation at step 0: {mode} -?[\d.]+ ± 0.0 \(1 episode, \d+ s\)$", out.stdout, re.M), out.stdout
        assert re.search(rf"^evaluation at step 10: {mode} -?[\d.]+ ± 0.0 \(1 episode, \d+ s\)$", out.stdout, re.M), out.stdout
        picture = imageio.imread(run_dir / f"saliency_{mode}.png")
        assert picture.shape == (84 * 2, 4 * 84 * 2, 3)  # the newest frame, attribution, mask, prediction
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert set(results) == set(envs.MODES) and all(r["episodes"] == 1 for r in results.values())
    assert "step 8: seed steps done, 8 catch-up updates" in out.stdout

    tested = ["color_hard", "video_hard"]
    out = run_script(["--checkpoint", str(run_dir / "checkpoint.pt"), "--eval-only", "--final-eval-episodes", "1", "--eval-modes", *tested,
                      "--data-dir", str(e2e_data_dir), "--output-dir", "runs"], tmp_path)
    assert "evaluating with the checkpoint's settings: cartpole, action repeat 50" in out.stdout
    (eval_dir,) = set((tmp_path / "runs").iterdir()) - {run_dir}
    assert eval_dir.name.startswith(f"eval__{run_dir.name}__")  # no glob for training runs picks it
    reloaded = json.loads((eval_dir / "results.json").read_text())
    assert reloaded["step"] == 10 and "evaluation at step 10: color_hard " in out.stdout and list(reloaded["results"]) == tested
    assert reloaded["checkpoint"] == str(run_dir / "checkpoint.pt") and json.loads((run_dir / "results.json").read_text())["checkpoint"] is None
    saved = sgqn.read_checkpoint(run_dir / "checkpoint.pt")
    _, eval_envs = sgqn.make_envs(sgqn.Args(**{**saved["args"], "data_dir": str(e2e_data_dir), "eval_modes": tested}))
    agent = sgqn.make_agent((9, 84, 84), 1, sgqn.Args(**saved["args"]), torch.device("cpu"))
    sgqn.load_agent(agent, saved, run_dir / "checkpoint.pt")
    for mode, eval_env in eval_envs.items():
        (expected,) = sgqn.evaluate(eval_env, agent.critic.encoder, agent.actor, 1, torch.device("cpu"))
        assert reloaded["results"][mode]["mean"] == pytest.approx(expected, rel=1e-6), mode

    report = load_benchmark("report")  # reads the real run folder, skips the --eval-only one
    groups = report.group_runs([str(run_dir), str(eval_dir)])
    assert list(groups) == [(("cartpole", 50), "sgsac")]
    train = results["train"]
    assert f"| cartpole (action repeat 50) | {train['mean']:.0f} ± {train['std']:.0f} ep (1) |" in report.tables(groups, None)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two tiny runs of the script in one process (imports paid once): plain SAC evaluated every 3 steps, and a
    run whose critic learning rate makes the losses diverge. -> {name: (exit status, stderr, run folder)}"""
    root = tmp_path_factory.mktemp("tiny")
    cases = {
        "sac": ["--env-id", "cartpole", *TINY.split(), "--eval-freq", "3", "--eval-modes", "train", "--consistency-coef", "0",
                "--aux-update-freq", "0"],
        "diverging": ["--env-id", "cartpole", *TINY.split(), "--total-timesteps", "40", "--checkpoint-freq", "4", "--critic-lr", "1e30",
                      "--eval-modes", "train"],
    }
    results = run_cases([[*argv, "--output-dir", name] for name, argv in cases.items()], root)
    return {name: (status, stderr, *(root / name).iterdir()) for name, (status, _, stderr) in zip(cases, results)}


def test_periodic_evaluation_and_plain_sac(tiny_runs):
    """The ablation switches at 0 give plain SAC (no consistency or aux loss); evaluation runs at step 0 (the
    untrained agent) and every eval_freq steps; each episode's row tells the elapsed time and the training speed."""
    status, stderr, run_dir = tiny_runs["sac"]
    assert status == 0, stderr
    assert run_dir.name.startswith("cartpole__sac__seed1__")  # no rho: no saliency
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("mode") == "train"] == [0, 3, 6, 9, 10]
    timed = [r for r in rows if "sps" in r]
    assert [r["step"] for r in timed] == [3, 6, 9, 10] and all(r["elapsed_hours"] > 0 and r["sps"] > 0 for r in timed)
    evaluated = [r["eval_seconds"] for r in rows if "eval_seconds" in r]
    assert len(evaluated) == 5 and 3600 * timed[-1]["elapsed_hours"] > sum(evaluated[:-1])  # the last one came after
    odd = [r for r in rows if r["step"] == 9 and "td" in r][0]
    assert "actor" in odd  # an odd step logs the last actor loss too
    last = [r for r in rows if "td" in r][-1]
    assert "aux" not in last and last["consistency"] == 0.0


def test_diverging_losses_stop_the_run_with_the_last_good_checkpoint(tiny_runs):
    status, stderr, run_dir = tiny_runs["diverging"]
    last = stderr.strip().splitlines()[-1]
    assert status == 1 and "Traceback" not in stderr
    assert re.fullmatch(r"error: loss \w+ is (nan|inf|-inf) at step (\d+): training diverged; the last good checkpoint \(step 4\) is in .*", last), last
    state = sgqn.read_checkpoint(run_dir / "checkpoint.pt")
    assert state["progress"]["step"] == 4 and all(math.isfinite(v) for v in state["progress"]["losses"].values())


def test_help_lists_the_switches(capsys):
    with pytest.raises(SystemExit) as e:
        sgqn.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--env-id", "--rho", "--consistency-coef", "--aux-update-freq", "--eval-only", "--overlay-dir",
                 "--resume", "--checkpoint-freq"):
        assert flag in out


def _bad_argument_cases(tmp_path):
    """(argv, words the error names): every integer and bounded float flag just out of its range (written out here,
    from what each flag means), relations between flags, sizes, paths."""
    counts = ["total-timesteps", "action-repeat", "frame-stack", "buffer-size", "batch-size", "learning-starts",
              "actor-update-freq", "overlay-images", "num-filters", "projection-dim", "hidden-dim", "eval-freq",
              "eval-episodes", "final-eval-episodes", "checkpoint-freq"]
    cases = [([f"--{name}", "0"], [f"--{name}", "at least 1"]) for name in counts]
    cases += [([f"--{name}", "-1"], [f"--{name}", "at least 0"]) for name in ("seed", "aux-update-freq", "shift-pad")]
    out_of_range = {"rho": ("0", "1"), "gamma": ("0", "1.01"), "critic-tau": ("-0.01", "1.01"), "encoder-tau": ("-0.01", "1.01"),
                    "overlay-alpha": ("-0.01", "1.01"), "init-temperature": ("0", "inf"), "consistency-coef": ("-0.01", "inf"),
                    "actor-lr": ("-1e-9", "inf"), "critic-lr": ("-1e-9", "inf"), "alpha-lr": ("-1e-9", "inf"), "aux-lr": ("-1e-9", "inf")}
    cases += [([f"--{name}", value], [f"--{name}", "must be in"]) for name, values in out_of_range.items() for value in values]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "images").mkdir()
    iio.imwrite(tmp_path / "images" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cases += [
        (["--learning-starts", "10", "--total-timesteps", "10"], ["--learning-starts", "--total-timesteps"]),
        (["--batch-size", "64", "--learning-starts", "32"], ["--batch-size", "--learning-starts"]),
        (["--batch-size", "64", "--learning-starts", "100", "--buffer-size", "50"], ["--batch-size", "--buffer-size"]),
        (["--env-id", "cartpol"], ["cartpol"]),
        (["--env-id", "walker-fly"], ["walker-fly"]),
        (["--eval-modes", "video_medium"], ["video_medium"]),
        (["--eval-only"], ["--checkpoint"]),
        (["--resume", str(tmp_path), "--eval-only"], ["--resume"]),
        (["--overlay-dir", "/no/such/folder"], ["--overlay-dir"]),
        (["--overlay-dir", str(tmp_path / "images"), "--overlay-images", "2", "--eval-modes", "train"], ["bad.jpg"]),
        (["--output-dir", str(tmp_path / "a_file" / "runs")], ["--output-dir", "not a writable folder"]),
        (["--output-dir", str(tmp_path / "dangling")], ["--output-dir", "dangling"]),
        (["--checkpoint", str(tmp_path / "notes.txt"), "--eval-only"], ["notes.txt", "not a readable checkpoint"]),
        (["--checkpoint", str(tmp_path / "none.pt")], ["none.pt", "not a readable checkpoint", "No such file"]),
    ]
    return cases


def _bad_checkpoint_and_data_cases(tmp_path, run_dir):
    """(argv, words the error names, exit status): settings that differ from a run's or checkpoint's, broken
    checkpoints, a corrupt and a missing DMC-GB file."""
    checkpoint = str(run_dir / "checkpoint.pt")
    truncated, torch_file = tmp_path / "truncated.pt", tmp_path / "weights.pt"
    truncated.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:100_000])
    torch.save({"critic": {}}, torch_file)
    data = tmp_path / "data"
    data.mkdir()
    source = ENVS_SHARED / "color_hard.pt" if ENVS_HAVE_SHARED else None
    if source is None:  # synthetic: not DMC-GB's file either, so it is reported as corrupt all the same
        _envs_write_colors(data / "color_hard.pt", 1)
    else:
        good = source.read_bytes()
        (data / "color_hard.pt").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    return [
        (["--resume", str(run_dir), "--action-repeat", "4"], ["--action-repeat", "differs", "50"], 2),
        (["--resume", str(run_dir), "--batch-size", "128"], ["--batch-size 128 differs"], 2),  # the default, given explicitly
        (["--resume", str(data)], ["--resume", "args.json"], 2),
        (["--resume", str(run_dir), "--total-timesteps", "59"], ["--total-timesteps 59 is below step 60"], 2),
        (["--eval-only", "--checkpoint", checkpoint, "--num-filters", "16"], ["--num-filters", "checkpoint's 8"], 2),
        (["--checkpoint", checkpoint, "--eval-modes", "train"], [checkpoint, "--num-filters 8", "does not fit"], 2),
        (["--checkpoint", str(truncated), "--eval-only"], ["truncated.pt", "not a readable checkpoint"], 2),
        (["--checkpoint", str(torch_file), "--eval-only"], ["weights.pt", "not a checkpoint of this sgqn.py"], 2),
        (["--eval-modes", "train", "color_hard", "video_easy", "--data-dir", str(data)],
         ["1 corrupt (color_hard.pt)", "10 missing (video_easy/video{0-9}.mp4)", "--data-dir", "--eval-modes train"], 1),
    ]


def test_bad_input_fails_in_one_line_before_any_work(tmp_path, resumed_runs):
    """Every bad flag, setting, checkpoint and data file: one line that says what to do, the right exit status, no
    training step and no run folder. All cases in one process (imports paid once), data verified, no download."""
    straight, _, _ = resumed_runs
    cases = [(argv, words, 2) for argv, words in _bad_argument_cases(tmp_path)] + _bad_checkpoint_and_data_cases(tmp_path, straight)
    runs = tmp_path / "runs"
    results = run_cases([[*argv, *(["--output-dir", str(runs)] if "--output-dir" not in argv else [])] for argv, _, _ in cases], tmp_path,
                        env={"DMCGB_VERIFY": "1", "DMCGB_DOWNLOAD": "0"})
    for (status, stdout, stderr), (argv, words, expected) in zip(results, cases):
        assert_one_line_error(status, stdout, stderr, words, expected)
    assert not runs.exists(), "a failed start must not leave a run folder"


def test_readme_commands_parse():
    """Every `python sgqn.py ...` in the README parses (placeholders aside), the main one is the documented one,
    and .ci/run calls the README's test command."""
    commands = readme_commands("python sgqn.py")
    assert "python sgqn.py --env-id cartpole --rho 0.98" in commands
    for command in commands:
        argv = [a if "<" not in a else "x" for a in shlex.split(command)[2:]]
        argv = [a if "$" not in a else "1" for a in argv]  # a shell variable: a value that parses as any type
        if "--help" not in argv:
            tyro.cli(sgqn.Args, args=argv)
    for command in readme_commands("python benchmarks/"):  # the benchmarks' flags parse too
        script, *argv = shlex.split(command)[1:]
        spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        argv = [a if "<" not in a else "x" for a in argv]
        tyro.cli(next(getattr(module, name) for name in ("Bench", "Report", "Probe", "Args") if hasattr(module, name)), args=argv)
    test_command = readme_commands("python -m pytest")
    assert test_command and test_command[0] in (ROOT / ".ci" / "run").read_text()


def test_run_folders_are_never_reused(tmp_path):
    args = sgqn.Args(output_dir=str(tmp_path))
    first, second = sgqn.make_run_dir(args), sgqn.make_run_dir(args)
    assert first != second and first.is_dir() and second.is_dir()


# ---- sgqn.py: the loop's glue ----
# What main hands to update, the evaluation protocol, the optimisers, the signals and a mid-episode env restore,
# each checked against something written here: the replay files, a hand-written evaluation loop, the paper's table.

GLUE = dict(seed=5, total_timesteps=12, learning_starts=8, batch_size=8, eval_freq=6, eval_episodes=2, final_eval_episodes=3,
            eval_modes=("train", "video_hard"), action_repeat=50, num_filters=8, hidden_dim=32, overlay_images=16)


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, e2e_data_dir):
    """One tiny run of sgqn.main in this process, every call of sgqn.update recorded: -> (run folder, [(batch, step)])."""
    root = tmp_path_factory.mktemp("glue")
    calls, real_update = [], sgqn.update

    def recording_update(agent, batch, step, args, overlay):
        calls.append(([x.detach().clone() for x in batch], step))
        return real_update(agent, batch, step, args, overlay)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sgqn, "update", recording_update)
        patch.setenv("DMCGB_VERIFY", "0")  # the tests' data folders are not DMC-GB's files
        run_dir = sgqn.main(sgqn.Args(**GLUE, data_dir=str(e2e_data_dir), output_dir=str(root)))
    return run_dir, calls


def _hand_shift(x, dy, dx, pad=4):
    """x (C, H, W) moved by (dy, dx): replicate padding by `pad`, then the crop at (pad + dy, pad + dx)."""
    h, w = x.shape[1:]
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def test_update_receives_shifted_replay_transitions_on_schedule(glue_run):
    """Every batch that update gets is B transitions of the replay buffer (rebuilt here from its files: frame
    stacks within an episode, oldest first), obs and next_obs each random-shifted on its own, reward (B, 1); and
    update runs learning_starts times at the end of the seed steps, then once a step."""
    run_dir, calls = glue_run
    B, k = GLUE["batch_size"], 3
    starts, total = GLUE["learning_starts"], GLUE["total_timesteps"]
    assert [step for _, step in calls] == [starts] * starts + list(range(starts + 1, total + 1))
    replay = run_dir / "replay"
    frames = np.fromfile(replay / "frames.bin", np.uint8).reshape(-1, 3, 84, 84)
    actions = np.fromfile(replay / "actions.bin", np.float32).reshape(len(frames), -1)
    rewards, t = np.fromfile(replay / "rewards.bin", np.float32), np.fromfile(replay / "t.bin", np.int64)

    def stack(i):  # the observation whose newest frame is i: k frames of its episode, repeating the first
        return np.concatenate([frames[i - min(back, t[i])] for back in range(k - 1, -1, -1)])

    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    obs_unshifted = next_unshifted = own_shifts = 0
    for (obs, action, reward, next_obs), _ in calls:
        assert obs.shape == next_obs.shape == (B, 3 * k, 84, 84) and obs.dtype == next_obs.dtype == torch.float32
        assert action.shape == (B, 1) and reward.shape == (B, 1)
        for b in range(B):
            (j,) = np.flatnonzero((actions[:, 0] == action[b, 0].item()) & (t > 0))  # random actions: one match each
            assert rewards[j] == reward[b, 0].item()
            seen = [{s for s in shifts if np.array_equal(_hand_shift(stack(i), *s), x[b].numpy())}
                    for i, x in ((j - 1, obs), (j, next_obs))]
            assert seen[0] and seen[1], "obs and next_obs are the transition's stacks, shifted by at most 4 pixels"
            obs_unshifted += (0, 0) in seen[0]
            next_unshifted += (0, 0) in seen[1]
            own_shifts += not seen[0] & seen[1]
    samples = len(calls) * B
    assert obs_unshifted < samples / 4 and next_unshifted < samples / 4 and own_shifts > samples / 2, \
        (obs_unshifted, next_unshifted, own_shifts, samples)


def _hand_mean_action(state, obs):
    """tanh of the policy mean, computed from the checkpoint's tensors (encoder convs, actor projection and trunk)."""
    x = torch.as_tensor(obs).float()[None] / 255
    convs = sorted({k.split(".")[2] for k in state["critic"] if k.startswith("encoder.convs.")}, key=int)
    for n, i in enumerate(convs):
        if n:
            x = F.relu(x)
        x = F.conv2d(x, state["critic"][f"encoder.convs.{i}.weight"], state["critic"][f"encoder.convs.{i}.bias"],
                     stride=2 if n == 0 else 1)
    a = state["actor"]
    h = F.linear(x.flatten(1), a["projection.0.weight"], a["projection.0.bias"])
    h = torch.tanh(F.layer_norm(h, h.shape[-1:], a["projection.1.weight"], a["projection.1.bias"]))
    for i in (0, 2):
        h = F.relu(F.linear(h, a[f"trunk.{i}.weight"], a[f"trunk.{i}.bias"]))
    mean = F.linear(h, a["trunk.4.weight"], a["trunk.4.bias"]).chunk(2, -1)[0]
    return torch.tanh(mean)[0].numpy()


def test_evaluation_protocol_by_hand(glue_run, e2e_data_dir):
    """Periodic evaluations at step 0 and every eval_freq steps with eval_episodes, the final one with
    final_eval_episodes; each on a test env seeded seed + 42, with the policy's mean action; the table is the mean
    and the population std. The final one is replayed here on a fresh env after the episodes the earlier ones used
    (a cartpole episode's draws do not depend on its actions)."""
    run_dir, _ = glue_run
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [(r["step"], r["mode"], r["episodes"]) for r in rows if "mode" in r]
    e, f = GLUE["eval_episodes"], GLUE["final_eval_episodes"]
    assert evals == [(0, "train", e), (0, "video_hard", e), (6, "train", e), (6, "video_hard", e), (12, "train", f), (12, "video_hard", f)]
    state = sgqn.read_checkpoint(run_dir / "checkpoint.pt")  # written just before the final evaluation
    results = json.loads((run_dir / "results.json").read_text())["results"]
    for mode in GLUE["eval_modes"]:
        env = envs.make_env("cartpole", GLUE["seed"] + 42, mode, GLUE["action_repeat"], 3, data_dir=e2e_data_dir)
        for _ in range(2 * e):  # the step-0 and step-6 evaluations' episodes
            env.reset()
            while not any(env.step(np.zeros(1, np.float32))[2:4]):
                pass
        returns = []
        for _ in range(f):
            obs, _ = env.reset()
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(_hand_mean_action(state, obs))
                total, done = total + reward, terminated or truncated
            returns.append(total)
        assert results[mode]["episodes"] == f
        assert results[mode]["mean"] == pytest.approx(sum(returns) / f, rel=1e-5), mode
        assert results[mode]["std"] == pytest.approx(math.sqrt(sum((r - sum(returns) / f) ** 2 for r in returns) / f), rel=1e-4, abs=1e-6)


def test_optimisers_own_their_parameters_with_the_papers_settings():
    """SPEC.md's table, written out: actor and critic Adam lr 1e-3, betas (0.9, 0.999); temperature init 0.1, Adam lr
    1e-4, betas (0.5, 0.999); the attribution predictor's Adam lr 3e-4, beta1 0.9, over the shared encoder, the critic's
    projection and the decoder. The critic's optimiser holds the encoder, the actor's does not."""
    agent = sgqn.make_agent(OBS_SHAPE, ACTION_DIM, sgqn.Args(num_filters=8, hidden_dim=32), torch.device("cpu"))
    critic, encoder = agent.critic, agent.critic.encoder
    expected = {
        "critic_optimizer": ([*critic.parameters()], 1e-3, (0.9, 0.999)),
        "actor_optimizer": ([*agent.actor.parameters()], 1e-3, (0.9, 0.999)),
        "alpha_optimizer": ([agent.log_alpha], 1e-4, (0.5, 0.999)),
        "aux_optimizer": ([*encoder.parameters(), *critic.projection.parameters(), *agent.decoder.parameters()], 3e-4, (0.9, 0.999)),
    }
    for name, (params, lr, betas) in expected.items():
        (group,) = getattr(agent, name).param_groups
        assert {id(p) for p in group["params"]} == {id(p) for p in params} and len(group["params"]) == len(params), name
        assert (group["lr"], group["betas"]) == (lr, betas), name
    assert not {id(p) for p in encoder.parameters()} & {id(p) for p in agent.actor.parameters()}
    assert not {id(p) for p in agent.critic_target.parameters()} & {id(p) for p in critic.parameters()}
    assert agent.log_alpha.exp().item() == pytest.approx(0.1)


def test_accepted_edge_values_pass_check_args():
    for edge in (dict(gamma=1.0), dict(critic_tau=0.0, encoder_tau=0.0), dict(critic_tau=1.0, encoder_tau=1.0),
                 dict(consistency_coef=0.0, aux_update_freq=0), dict(overlay_alpha=0.0), dict(overlay_alpha=1.0), dict(shift_pad=0)):
        sgqn.check_args(sgqn.Args(**edge))  # returns, no SystemExit


def test_env_state_restored_mid_episode_on_video_hard(e2e_data_dir):
    """get_state amid an episode on video_hard, set_state on a fresh env made with another seed: the next frames,
    rewards and video frames are those of the env that was never interrupted."""
    env = envs.make_env("cartpole", 3, "video_hard", 8, 3, data_dir=e2e_data_dir)
    actions = _envs_actions(env, 12, seed=4)
    env.reset()
    env.reset()  # the second episode: a later video
    for a in actions[:5]:
        env.step(a)
    state = env.get_state()
    straight = [env.step(a) for a in actions[5:]]
    other = envs.make_env("cartpole", 99, "video_hard", 8, 3, data_dir=e2e_data_dir)  # fresh, never reset: as on resume
    resumed_obs = other.set_state(state)
    assert np.array_equal(resumed_obs, np.concatenate(list(state["frames"].numpy())))
    resumed = [other.step(a) for a in actions[5:]]
    for (o1, r1, *_, i1), (o2, r2, *_, i2) in zip(straight, resumed):
        assert np.array_equal(o1, o2) and r1 == r2 and i1 == i2
    assert state["t"] == 5 and not np.array_equal(straight[0][0], straight[-1][0])  # mid-episode, and it played on


SIGNALLED = ("--env-id cartpole --total-timesteps 60 --learning-starts 24 --batch-size 16 --eval-freq 1000 --checkpoint-freq 7 "
             "--eval-episodes 1 --final-eval-episodes 1 --action-repeat 50 --overlay-images 16 --eval-modes train")


def test_signals_through_the_real_script(resumed_runs, tmp_path, e2e_data_dir):
    """SIGTERM checkpoints and exits 143; a second signal after Ctrl-C stops at once and keeps the previous checkpoint whole;
    Ctrl-C during --eval-only exits 130 with one line. Each signal lands amid the catch-up (or the evaluation)."""
    straight, _, _ = resumed_runs
    args = [*SIGNALLED.split(), "--data-dir", str(e2e_data_dir)]
    term, twice = start_script([*args, "--output-dir", "term"], tmp_path), start_script([*args, "--output-dir", "twice"], tmp_path)
    evaluating = start_script(["--checkpoint", str(straight / "checkpoint.pt"), "--eval-only", "--final-eval-episodes", "100",
                               "--eval-modes", "train", "--data-dir", str(e2e_data_dir), "--output-dir", "eval"], tmp_path)
    for process in (term, twice):
        for line in process.stdout:
            if "24 catch-up updates" in line:
                break
    term.send_signal(signal.SIGTERM)
    twice.send_signal(signal.SIGINT)  # then a second signal at once: Python handles SIGINT before SIGTERM even when
    twice.send_signal(signal.SIGTERM)  # both land in one long torch call (two SIGINTs there would count as one)
    while not (tmp_path / "eval").exists() and evaluating.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # into the episodes
    evaluating.send_signal(signal.SIGINT)
    for process, status in ((term, 143), (twice, 130), (evaluating, 130)):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == status and "Traceback" not in stderr, (status, stderr)
    (term_dir,), (twice_dir,), (eval_dir,) = ((tmp_path / name).iterdir() for name in ("term", "twice", "eval"))
    assert sgqn.read_checkpoint(term_dir / "checkpoint.pt")["progress"]["step"] == 24
    assert sgqn.read_checkpoint(twice_dir / "checkpoint.pt")["progress"]["step"] == 21  # the one before the catch-up
    assert not list(twice_dir.glob(".*.tmp"))
    assert stderr.strip().splitlines()[-1] == f"interrupted; the evaluation's outputs so far are in {eval_dir.relative_to(tmp_path)}"
    assert not (eval_dir / "results.json").exists()


def test_one_process_per_run_folder_and_write_failures(resumed_runs, tmp_path):
    """A second process on a run folder stops before any work with one line; a write that fails (here a file-size
    limit, EFBIG) is one line naming the cause, leaves no temporary file and the checkpoint whole,
    and --resume continues once the cause is gone."""
    straight, _, _ = resumed_runs
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = run_script(["--resume", str(run), "--total-timesteps", "64"], tmp_path, check=False)
    assert_one_line_error(out.returncode, out.stdout, out.stderr, ["in use by another process", str(run)], 1)
    before = (run / "checkpoint.pt").read_bytes()
    limit = (run / "replay" / "frames.bin").stat().st_size  # the next frames cannot be appended
    env = {**os.environ, "DMCGB_VERIFY": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "sgqn.py"), "--resume", str(run), "--total-timesteps", "64"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.fullmatch(r"error: writing in .*run failed: File too large; fix the cause; the last good checkpoint is "
                        r"step 60; resume with: python sgqn\.py --resume .*run", last), last
    assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    out = run_script(["--resume", str(run), "--total-timesteps", "64"], tmp_path)
    assert json.loads((run / "results.json").read_text())["step"] == 64


def test_sgqn_py_lines_fit_120_columns():
    wide = [n for n, line in enumerate((ROOT / "sgqn.py").read_text().splitlines(), 1) if len(line) > 120]
    assert not wide, f"sgqn.py lines wider than 120 columns: {wide}"


def test_resume_with_cut_or_missing_replay_files_fails_in_one_line(resumed_runs, tmp_path):
    """A run folder whose replay files are shorter than its checkpoint says, or missing, is one line on --resume, and
    the checkpoint stays as it was."""
    straight, _, _ = resumed_runs
    cut, missing = tmp_path / "cut", tmp_path / "missing"
    for run in (cut, missing):
        shutil.copytree(straight, run)
    with open(cut / "replay" / "frames.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 3 * 84 * 84)  # one frame short
    (missing / "replay" / "actions.bin").unlink()
    results = run_cases([["--resume", str(cut)], ["--resume", str(missing)]], tmp_path, env={"DMCGB_VERIFY": "0"})
    for (status, stdout, stderr), words in zip(results, (["frames.bin", "shorter than its checkpoint"], ["actions.bin"])):
        assert_one_line_error(status, stdout, stderr, ["--resume", "does not fit its other files", *words], 1)
    assert (cut / "checkpoint.pt").read_bytes() == (straight / "checkpoint.pt").read_bytes()


def test_real_dmcgb_data_used():
    """Says which variant the data-dependent tests ran: the real DMC-GB files of ../shared/dmcgb, or (a visible skip)
    the small synthetic ones."""
    if not ENVS_HAVE_SHARED:
        pytest.skip("../shared/dmcgb is absent: the DMC-GB tests ran on synthetic data only")
    assert len(envs.required_files("video_hard")) == len(list((ENVS_SHARED / "video_hard").glob("video*.mp4"))) == 100


# ---- benchmarks/learning.py and benchmarks/report.py ----

def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root, env_id, algo, seed, curves, final=None, action_repeat=8, total_timesteps=None):
    """A run folder as sgqn.py leaves it: curves {mode: {step: return}}, final {mode: (mean, std, episodes)} or None
    (an unfinished run, without results.json), the results at the last step of curves, which is the run's length
    unless total_timesteps says otherwise (a run extended with --resume)."""
    run_dir = root / f"{env_id}__{algo}__seed{seed}"
    run_dir.mkdir(parents=True)
    switches = {"sgsac": {}, "sac": dict(consistency_coef=0.0, aux_update_freq=0), "sac-consistency": dict(aux_update_freq=0)}[algo]
    last = max(next(iter(curves.values())))
    args = sgqn.Args(env_id=env_id, seed=seed, action_repeat=action_repeat, total_timesteps=total_timesteps or last, **switches)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    rows = [dict(step=step, mode=mode, eval_return=value, eval_std=1.0, episodes=5) for mode, c in curves.items() for step, value in c.items()]
    rows.insert(1, dict(step=125, frames=1000, td=1.0, episodic_return=123.0))  # a training row, ignored
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if final:
        results = {mode: dict(mean=m, std=s, episodes=n) for mode, (m, s, n) in final.items()}
        (run_dir / "results.json").write_text(json.dumps(dict(step=last, results=results)))
    return str(run_dir)


def test_report_table_and_curves(tmp_path):
    """report.py's Table 1 layout: mean ± std over seeds (numpy's std, ddof 0) with n; one seed shows its episodes'
    std; an unfinished run (or one extended past its results) counts in the curves only; the random policy only on
    its own task. The curves are the mean over seeds with the lowest-to-highest range."""
    report = load_benchmark("report")
    balance, walker = "cartpole-balance", "walker-stand"
    dirs = [write_run(tmp_path, balance, "sgsac", seed, {"train": {0: 100 * seed, 500: 200 * seed}, "video_hard": {0: 10 * seed, 500: 20 * seed}},
                      {"train": (400 + 100 * seed, 9.0, 10), "video_hard": (200 + 100 * seed, 9.0, 10)}) for seed in (1, 2, 3)]
    dirs.append(write_run(tmp_path, balance, "sac", 1, {"train": {0: 50, 500: 60}, "video_hard": {0: 5, 500: 6}},
                          {"train": (250.4, 30.2, 10), "video_hard": (101.0, 12.0, 10)}))
    dirs.append(write_run(tmp_path, balance, "sac", 2, {"train": {0: 70, 500: 90, 1000: 95}, "video_hard": {0: 7, 500: 8}}))  # unfinished
    dirs += [write_run(tmp_path, walker, "sac", seed, {"train": {0: seed}}, {"train": (300.0 + 50 * seed, 1.0, 10)}, action_repeat=4)
             for seed in (1, 2)]
    dirs.append(write_run(tmp_path, walker, "sac", 3, {"train": {0: 3}}, {"train": (900.0, 1.0, 10)}, action_repeat=4,
                          total_timesteps=2000))  # finished at step 0, then extended with --resume: unfinished again
    random = dict(env_id=balance, action_repeat=8, seed=1, returns={"train": [100.0, 300.0], "video_hard": [100.0, 300.0]})
    groups = report.group_runs(dirs)
    lines = report.tables(groups, random).splitlines()
    assert "| task | SG-SAC | SAC | random policy |" in lines
    train, video_hard = lines.index(next(l for l in lines if l.startswith("train:"))), lines.index(next(l for l in lines if l.startswith("video_hard:")))
    assert lines[train + 3 : train + 5] == ["| cartpole-balance (action repeat 8) | 600 ± 82 (3) | 250 ± 30 ep (1) | 200 ± 100 ep (2) |",
                                            "| walker-stand (action repeat 4) | - | 375 ± 25 (2) | - |"]
    assert lines[video_hard + 3] == "| cartpole-balance (action repeat 8) | 400 ± 82 (3) | 101 ± 12 ep (1) | 200 ± 100 ep (2) |"
    assert lines[-1].startswith("unfinished (curves only): ") and dirs[4] in lines[-1] and dirs[7] in lines[-1]

    fig = report.plot(groups, random, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    axes = np.array(fig.axes[: 2 * 2]).reshape(2, 2)  # (tasks, modes); the frames axes come after
    sgsac, sac, random_line = axes[0, 0].lines
    assert list(sgsac.get_xdata()) == [0, 500] and list(sgsac.get_ydata()) == [200, 400]  # mean of seeds 1-3
    assert list(sac.get_xdata()) == [0, 500] and list(sac.get_ydata()) == [60, 75]  # step 1000: seed 2 only
    assert sac.get_label() == "SAC (n=2)" and list(random_line.get_ydata()) == [200, 200]
    sgsac_band, sac_band = axes[0, 0].collections  # the ranges over seeds
    assert {tuple(v) for v in sgsac_band.get_paths()[0].vertices} >= {(0, 100), (0, 300), (500, 200), (500, 600)}
    assert {tuple(v) for v in sac_band.get_paths()[0].vertices} >= {(0, 50), (0, 70), (500, 60), (500, 90)}
    assert not axes[1, 0].get_legend_handles_labels()[1].count("random policy")  # walker: another task


def test_report_permutation_test(tmp_path):
    """The exact one-sided permutation test, by hand: 2 + 2 seeds have 6 relabellings, 3 + 3 have 20; the observed
    split counts; ties count as at least as extreme. report.py prints it where SG-SAC and SAC have 2 finished seeds."""
    report = load_benchmark("report")
    assert report.permutation_p([3, 4], [1, 2]) == pytest.approx(1 / 6)  # only the observed split is as extreme
    assert report.permutation_p([1, 2], [3, 4]) == 1.0
    assert report.permutation_p([2, 4], [1, 3]) == pytest.approx(2 / 6)  # {2,4} and {3,4}: differences 1 and 2
    assert report.permutation_p([5, 6, 7], [1, 2, 3]) == pytest.approx(1 / 20)
    assert report.permutation_p([1, 1], [1, 1]) == 1.0
    dirs = [write_run(tmp_path, "cartpole-balance", algo, seed, {"video_hard": {0: 1}}, {"video_hard": (final, 1.0, 10)})
            for algo, seed, final in (("sgsac", 1, 400.0), ("sgsac", 2, 300.0), ("sac", 1, 200.0), ("sac", 2, 350.0))]
    lines = report.tables(report.group_runs(dirs), None).splitlines()
    assert "cartpole-balance (action repeat 8): SG-SAC's mean above SAC's by chance alone in a share p = 0.333 of the " \
           "relabellings of its 2 + 2 seeds (exact permutation test)" in lines  # 350 vs 275: {400,350} and {400,300}


def test_report_joins_eval_only_results_to_their_run(tmp_path, capsys):
    """An --eval-only folder of a finished run's final checkpoint adds the modes that run did not evaluate to its
    final results (never replacing its own); one of another checkpoint or step is skipped, with a line."""
    report = load_benchmark("report")
    run = write_run(tmp_path, "cartpole-balance", "sgsac", 1, {"train": {0: 1, 500: 2}}, {"train": (400.0, 9.0, 10)})
    for name, step, checkpoint in (("eval__a", 500, Path(run) / "checkpoint.pt"), ("eval__b", 0, Path(run) / "checkpoint.pt"),
                                   ("eval__c", 500, tmp_path / "elsewhere" / "checkpoint.pt")):
        (tmp_path / name).mkdir()
        results = {"train": dict(mean=999.0, std=0.0, episodes=10), "color_hard": dict(mean=300.0 if name == "eval__a" else 700.0,
                                                                          std=5.0, episodes=10)}
        (tmp_path / name / "results.json").write_text(json.dumps(dict(step=step, results=results, checkpoint=str(checkpoint))))
    groups = report.group_runs([run, *(str(tmp_path / name) for name in ("eval__a", "eval__b", "eval__c"))])
    assert groups[("cartpole-balance", 8), "sgsac"][0]["final"] == {"train": (400.0, 9.0, 10), "color_hard": (300.0, 5.0, 10)}
    out = capsys.readouterr().out
    assert f"eval__a: color_hard added to {run}" in out and out.count("skipped") == 2
    assert "| cartpole-balance (action repeat 8) | 300 ± 5 ep (1) |" in report.tables(groups, None)


def test_report_rejects_bad_folders(tmp_path):
    report = load_benchmark("report")
    run = write_run(tmp_path / "a", "cartpole", "sac", 1, {"train": {0: 1}})
    twin = write_run(tmp_path / "b", "cartpole", "sac", 1, {"train": {0: 2}})
    for run_dirs, words in [((str(tmp_path),), "not a run folder"), ((run, twin), "seed 1")]:
        with pytest.raises(SystemExit) as e:
            report.main(report.Report(run_dirs=run_dirs))
        assert words in str(e.value) and str(e.value).startswith("error: ")


def test_learning_final_modes_are_those_with_complete_data(tmp_path, monkeypatch):
    """The modes learning.py evaluates at the end beside CONFIG's: those whose every file is in --data-dir (6 of 10
    video_easy videos is not enough), or every mode when sgqn.py may download them."""
    learning = load_benchmark("learning")
    config = dict(learning.CONFIG, **{"eval-modes": ["train", "video_hard"]})
    (tmp_path / "color_easy.pt").write_bytes(b"x")
    (tmp_path / "color_hard.pt").write_bytes(b"x")
    (tmp_path / "video_easy").mkdir()
    for i in range(6):
        (tmp_path / "video_easy" / f"video{i}.mp4").write_bytes(b"x")
    assert learning.final_modes(config, str(tmp_path)) == ["color_easy", "color_hard"]
    (tmp_path / "color_hard.pt").unlink()
    assert learning.final_modes(config, str(tmp_path)) == ["color_easy"]
    monkeypatch.delenv("DMCGB_DOWNLOAD", raising=False)
    assert learning.final_modes(config, None) == ["color_easy", "color_hard", "video_easy"]
    monkeypatch.setenv("DMCGB_DOWNLOAD", "0")
    monkeypatch.setenv("DMCGB_DATA_DIR", str(tmp_path))
    assert learning.final_modes(config, None) == ["color_easy"]


def test_learning_benchmark_end_to_end(tmp_path, e2e_data_dir):
    """benchmarks/learning.py for a few steps: both runs (one thread each), evaluations from step 0, each final
    checkpoint on the other modes (--eval-only, their results in the table), the random policy on every mode, the
    picture; and it never writes into a used folder."""
    learning = load_benchmark("learning")
    data = ["--data-dir", str(ENVS_SHARED), "--reuse-videos"] if ENVS_HAVE_SHARED else ["--data-dir", str(e2e_data_dir)]
    modes = ["train", "video_hard"]  # CONFIG's modes but color_hard, to save a third of the episodes
    tiny = "--total-timesteps 6 --learning-starts 4 --batch-size 4 --eval-freq 3 --eval-episodes 1 --final-eval-episodes 2 --overlay-images 16"
    command = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--seed", "3", "--output-dir", str(tmp_path / "out"), *data,
               f"--sgqn-flags={tiny} --action-repeat 50 --eval-modes {' '.join(modes)}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = {d.name.split("__")[1]: d for d in (tmp_path / "out").iterdir() if d.is_dir() and "__" in d.name}
    assert set(runs) == {"sgsac", "sac"}
    for algo, run_dir in runs.items():
        args = json.loads((run_dir / "args.json").read_text())
        assert (args["env_id"], args["num_filters"], args["seed"], args["action_repeat"]) == ("cartpole-balance", 16, 3, 50)
        assert (args["consistency_coef"] == 0) == (algo == "sac")
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert sorted((r["step"], r["mode"]) for r in rows if "eval_return" in r) == sorted((s, m) for s in (0, 3, 6) for m in modes)
    extra = ["color_easy", "color_hard", "video_easy"]  # the test data is complete: every other mode
    evaluated = {Path(json.loads((d / "results.json").read_text())["checkpoint"]).parent: json.loads((d / "results.json").read_text())
                 for d in (tmp_path / "out" / "evals").iterdir()}
    assert set(evaluated) == set(runs.values()) and all(list(r["results"]) == extra and r["step"] == 6 for r in evaluated.values())
    random = json.loads((tmp_path / "out" / "random_policy.json").read_text())
    assert random["action_repeat"] == 50 and list(random["returns"]) == modes + extra
    assert all(len(r) == 2 and r == random["returns"]["train"] for r in random["returns"].values())  # physics only
    assert "| task | SG-SAC | SAC | random policy |" in out.stdout and (tmp_path / "out" / "learning.png").stat().st_size > 0
    for mode in modes + extra:  # a table per mode, both algorithms filled in
        table = out.stdout.split(f"\n{mode}: final return")[1]
        assert re.search(r"\| cartpole-balance \(action repeat 50\) \| -?\d+ ± \d+ ep \(1\) \| -?\d+ ± \d+ ep \(1\) \|", table), mode

    with pytest.raises(SystemExit) as again:  # before any work: in this process
        learning.main(tyro.cli(learning.Bench, args=command[2:]))
    assert str(again.value).startswith("error: ") and "not empty" in str(again.value) and "\n" not in str(again.value)

    # interrupted amid SAC's final evaluation, before the other steps: --resume does only what is left
    (runs["sac"] / "results.json").unlink()
    (tmp_path / "out" / "random_policy.json").unlink()
    shutil.rmtree(next(d for d in (tmp_path / "out" / "evals").iterdir() if runs["sac"].name in d.name))
    sgsac_rows = (runs["sgsac"] / "metrics.jsonl").read_bytes()
    resumed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--resume", "--output-dir",
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert json.loads((runs["sac"] / "results.json").read_text())["step"] == 6
    assert (runs["sgsac"] / "metrics.jsonl").read_bytes() == sgsac_rows  # the finished run is left alone
    evaluated = sorted(Path(json.loads((d / "results.json").read_text())["checkpoint"]).parent.name
                       for d in (tmp_path / "out" / "evals").iterdir())
    assert evaluated == sorted(d.name for d in runs.values())
    assert json.loads((tmp_path / "out" / "random_policy.json").read_text()) == random  # same seed, same returns
    assert resumed.stdout.split("\n\nvideo_hard: final return")[1] == out.stdout.split("\n\nvideo_hard: final return")[1]
    with pytest.raises(SystemExit) as nothing:
        learning.main(tyro.cli(learning.Bench, args=["--resume", "--output-dir", str(tmp_path / "none")]))
    assert str(nothing.value).startswith("error: --resume: ") and "\n" not in str(nothing.value)


def test_probe_critic_reads_the_replay_read_only(resumed_runs, tmp_path, capsys):
    """benchmarks/probe_critic.py: its view of a run's replay files is the buffer that --resume loads (here a ring
    that wrapped: 64 frames in 25 slots), the files stay as they were, two bit-identical runs give identical rows,
    and a mask that keeps every pixel closes the consistency gap exactly."""
    probe_critic = load_benchmark("probe_critic")
    straight, cut, _ = resumed_runs
    saved, before = sgqn.read_checkpoint(straight / "checkpoint.pt"), {p: p.read_bytes() for p in (straight / "replay").iterdir()}
    args = sgqn.Args(**saved["args"])
    view = probe_critic.read_replay(straight, saved, args)
    shutil.copytree(straight / "replay", tmp_path / "replay")
    loaded = sgqn.ReplayBuffer(args.buffer_size, (3, 84, 84), 1, args.frame_stack)
    sgqn.load_replay(loaded, tmp_path / "replay", saved["buffer_added"])
    oldest = saved["buffer_added"] - args.buffer_size
    for name in ("frames", "actions", "rewards", "t"):
        assert np.array_equal(getattr(view, name), np.roll(getattr(loaded, name), -(oldest % args.buffer_size), axis=0)), name

    probe_critic.main(probe_critic.Probe(run_dirs=(str(straight), str(cut)), samples=8))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cartpole")]
    assert len(rows) == 2 and rows[0].split(" | ")[1:] == rows[1].split(" | ")[1:] and "step 60, rho 0.98" in rows[0]
    assert {p: p.read_bytes() for p in (straight / "replay").iterdir()} == before

    agent = sgqn.make_agent((9, 84, 84), 1, args, torch.device("cpu"))
    sgqn.load_agent(agent, saved, straight / "checkpoint.pt")
    obs, action, reward, next_obs = view.sample(8, np.random.default_rng(0))
    batch = (torch.as_tensor(obs).float(), torch.as_tensor(action), torch.as_tensor(reward)[:, None], torch.as_tensor(next_obs).float())
    measures = probe_critic.probe(agent, batch, 1e-9, args.gamma)  # the lowest quantile: every pixel is salient
    assert measures["consistency gap"] == 0.0 and all(math.isfinite(v) for v in measures.values())
    assert probe_critic.probe(agent, batch, 0.98, args.gamma)["consistency gap"] > 0
    with pytest.raises(SystemExit) as e:
        probe_critic.main(probe_critic.Probe(run_dirs=()))
    assert str(e.value) == "error: give one or more run folders of sgqn.py (each with a checkpoint.pt)"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        probe_critic.main(probe_critic.Probe(run_dirs=(str(tmp_path),)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: run folder: {tmp_path}/checkpoint.pt is not a readable checkpoint (") and \
        "No such file" in err and err.count("\n") == 1


def test_probe_scenes_pairs_the_same_states(resumed_runs, e2e_data_dir, capsys):
    """benchmarks/probe_scenes.py: against the training scene itself every shift is exactly 0 (and masking leaves
    the consistency gap); on video_hard the scene moves the features; envs whose states part are refused."""
    probe_scenes = load_benchmark("probe_scenes")
    straight, _, _ = resumed_runs
    shifts = ["Q1 shift", "action shift", "conv features", "critic projection", "actor projection"]
    tables = {}
    for mode in ("train", "video_hard"):
        probe_scenes.main(probe_scenes.Probe(run_dirs=(str(straight),), mode=mode, episodes=1))
        header, _, row = capsys.readouterr().out.splitlines()[1:]
        cells = [[cell.strip() for cell in line.strip("|").split("|")[1:]] for line in (header, row)]
        tables[mode] = dict(zip(cells[0], map(float, cells[1])))
    assert all(tables["train"][name] == 0.0 for name in shifts) and tables["train"]["Q1 shift, masked"] > 0
    assert all(tables["video_hard"][name] > 0 for name in shifts) and all(map(math.isfinite, tables["video_hard"].values()))
    assert tables["train"]["return"] == tables["video_hard"]["return"]  # the policy drives on the training scene in both

    saved = sgqn.read_checkpoint(straight / "checkpoint.pt")
    args = sgqn.Args(**saved["args"])
    agent = sgqn.make_agent((9, 84, 84), 1, args, torch.device("cpu"))
    pair = [envs.make_env("cartpole", seed, mode, 50, data_dir=e2e_data_dir) for seed, mode in ((1, "train"), (2, "video_hard"))]
    with pytest.raises(SystemExit) as e:
        probe_scenes.paired_rollouts(agent, *pair, 1, args.rho)
    assert str(e.value) == "error: the video_hard env's physics left the training env's at step 0; the scenes must differ only in how they look"
    with pytest.raises(SystemExit) as e:
        probe_scenes.main(probe_scenes.Probe(run_dirs=(str(straight),), mode="video"))
    assert str(e.value).startswith("error: unknown mode 'video': use one of train, ")
    with pytest.raises(SystemExit) as e:
        probe_scenes.main(probe_scenes.Probe(run_dirs=(str(straight),), episodes=0))
    assert str(e.value) == "error: --episodes must be at least 1, got 0"


def test_readme_results_table_is_what_report_computes_from_the_logs():
    """The README's results table (SG-SAC, SAC and p per mode) is report.py's output over the runs' logs in docs/runs
    (args.json, metrics.jsonl and results.json of each run and --eval-only evaluation, as learning.py left them)."""
    folders = [str(p) for seed in sorted((ROOT / "docs" / "runs").iterdir()) for p in [*sorted(seed.glob("*__*")),
                                                                                        *sorted(seed.glob("evals/*"))]]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), *folders], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = re.findall(r"^\| (train|color_easy|color_hard|video_hard) \| ([^|]+) \| ([^|]+) \| ([\d.]+) \|",
                      (ROOT / "README.md").read_text(), re.M)
    assert [row[0] for row in rows] == ["train", "color_easy", "color_hard", "video_hard"]
    for mode, sgsac, sac, p in rows:
        table = out.stdout.split(f"\n{mode}: final return")[1].split("\n\n")[0]
        assert f"| {sgsac.strip()} | {sac.strip()} |" in table, (mode, table)
        assert float(p) == round(float(re.search(r"p = ([\d.]+)", table).group(1)), 2), (mode, table)


def test_saliency_figure_takes_each_runs_newest_frame(tmp_path):
    """benchmarks/saliency_figure.py: from an older run's picture (a row per frame) and a current one (the newest frame
    only) it takes the newest frame's row; a folder without a SAC and an SG-SAC picture is a one-line error."""
    figure = load_benchmark("saliency_figure")
    rows = np.concatenate([np.full((168, 672, 3), value, np.uint8) for value in (10, 20, 30)])  # frames oldest..newest
    assert (figure.newest_frame_row(rows) == 30).all() and figure.newest_frame_row(rows[-168:]).shape == (168, 672, 3)
    for seed in (1, 2):
        for name in (f"cartpole-balance__sac__seed{seed}__t", f"cartpole-balance__sgsac__rho0.98__seed{seed}__t"):
            (tmp_path / f"s{seed}" / name).mkdir(parents=True)
            iio.imwrite(tmp_path / f"s{seed}" / name / "saliency_video_hard.png", rows if seed == 1 else rows[-168:])
    out = tmp_path / "figure.png"
    figure.main(figure.Figure(folders=(str(tmp_path / "s1"), str(tmp_path / "s2")), out=str(out)))
    assert iio.imread(out).ndim == 3
    (tmp_path / "s3").mkdir()
    with pytest.raises(SystemExit) as error:
        figure.main(figure.Figure(folders=(str(tmp_path / "s3"),), out=str(out)))
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
