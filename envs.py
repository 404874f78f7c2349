"""DeepMind Control from pixels, with the test modes of the DMControl Generalization Benchmark (DMC-GB).

Rebuilds the environment SGQN trains and is tested on: DMC-GB's src/env/wrappers.py on top of its dmc2gym
(github.com/nicklashansen/dmcontrol-generalization-benchmark), as a small class without gym.

- Pixels: camera 0, image_size x image_size RGB, rendered once per agent step after the last repeated
  simulator step. Observations stack `frame_stack` frames on the channel axis, oldest first; reset repeats
  the first frame.
- Action repeat sums the rewards of the repeated steps. An episode is 1000 simulator steps, i.e.
  ceil(1000 / action_repeat) agent steps (250 at the default repeat of 4), and ends by truncation only.
  The paper's appendix ("starred" results) uses repeat 8 for cartpole and 2 for finger.
- Actions live in [-1, 1]^A and are mapped affinely onto the task's bounds, as dmc2gym does (the identity
  for every DMC-GB task); an action outside [-1, 1] (beyond float rounding) is rejected, as dmc2gym asserts.
- Modes: "train" is the default scene. "color_easy"/"color_hard": every reset repaints sky, floor and body
  with the next entry of DMC-GB's colour table, drawn by np.random.RandomState(seed). "video_easy"/
  "video_hard": the sky (hard: also the floor) is made green and green pixels are replaced by the frames of
  a natural video, one video per episode in order (the first episode uses video 1), one frame per step.
- DMC-GB tests on environments seeded with seed + 42: passing that seed is the caller's job.

    import envs
    env = envs.make_env("walker", seed=0 + 42, mode="video_hard")  # or "walker-stand", "ball_in_cup-catch"
    obs, info = env.reset()                                       # uint8 (9, 84, 84)
    obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_shape, np.float32))

The test modes need DMC-GB's src/env/data files (color_*.pt, video_*/video*.mp4), looked up in `data_dir`,
else $DMCGB_DATA_DIR, else ${XDG_CACHE_HOME:-~/.cache}/sgqn/dmcgb. Missing files are downloaded there from
the pinned commit ($DMCGB_URL replaces the base URL, DMCGB_DOWNLOAD=0 forbids downloading), and every file is
checked against its git blob id before it is used (a stamp file .verified.json remembers what passed, by size
and mtime; DMCGB_VERIFY=0 skips the check, for scenes of your own). ensure_data(modes, root) does this for
several modes at once and names every missing and corrupt file in one DataError.

overlay_images(folder, n, size, seed) loads the distractors of SGQN's overlay augmentation: photographs from a
folder (Places365 in the paper) or, without one, procedural images with a natural-image (1/f) spectrum.

env.get_state() and env.set_state(state) save and restore everything an env's future depends on (MuJoCo's
integration state, the frame stack, the task's, colour and video draws), mid-episode too, so that a run can
be resumed exactly.

Where we differ from DMC-GB, and why:
- Videos are decoded with imageio's ffmpeg, DMC-GB uses OpenCV: the two may differ in the last bit of the
  YUV->RGB conversion. Only the first max_episode_steps + 1 frames (all an episode can show) are decoded,
  resized once and cached (the last MAX_CACHED_VIDEOS videos); DMC-GB decodes the whole video every reset.
- The green screen is vectorised numpy, bit-identical to DMC-GB's per-pixel loop (tested).
- Colours are applied to a copy of dm_control's common assets: DMC-GB's patched dm_control edits them in
  its own `settings` module; we leave dm_control's global ASSETS alone so that envs of several modes can
  share a process. Video modes turn the scene green once at creation, DMC-GB at every reset (same result).
- No gym: reset/step follow the gymnasium signature; info reports the colour or video frame in use.
"""

import os
import sys

if sys.platform.startswith("linux"):
    # dm_control picks its OpenGL backend when first imported; EGL renders without a display.
    os.environ.setdefault("MUJOCO_GL", "egl")

import collections
import contextlib
import hashlib
import http.client
import importlib
import json
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import imageio.v2 as imageio
import mujoco
import numpy as np
import torch  # colour tables are torch pickles; video frames are resized with the same torch call as DMC-GB
import torch.nn.functional as F

MODES = ("train", "color_easy", "color_hard", "video_easy", "video_hard")
TASKS = {  # a domain alone means its DMC-GB task
    "walker": ("walker", "walk"),
    "cartpole": ("cartpole", "swingup"),
    "ball_in_cup": ("ball_in_cup", "catch"),
    "finger": ("finger", "spin"),
    "cheetah": ("cheetah", "run"),
    "reacher": ("reacher", "easy"),
}
ACTION_TOLERANCE = 1e-6  # dmc2gym asserts actions are in [-1, 1]; we forgive float rounding beyond that
EPISODE_LENGTH = 1000  # simulator steps, every task (dmc2gym's episode_length)
DATA_REPO = "nicklashansen/dmcontrol-generalization-benchmark"
DATA_COMMIT = "ff9c0aa8d47685ed972414c67f1b7225e37ff85e"
DATA_URL = f"https://raw.githubusercontent.com/{DATA_REPO}/{DATA_COMMIT}/src/env/data"
NUM_VIDEOS = {"video_easy": 10, "video_hard": 100}
MAX_CACHED_VIDEOS = 10  # ~53 MB at repeat 4: all of video_easy stays decoded; video_hard decodes per episode
GREEN = (0.2, 0.8, 0.2)
INTEGRATION_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # all MuJoCo needs to continue a simulation exactly
HSV_MIN, HSV_MAX = (100, 80, 70), (185, 255, 255)  # DMC-GB's "green": hue in degrees, s and v on 0-255
RENDERER_HELP = (
    "no working MuJoCo renderer (MUJOCO_GL={gl}: {error}); on Debian/Ubuntu run "
    "`apt-get install libegl1 libopengl0 libgl1-mesa-dri` and use MUJOCO_GL=egl, "
    "or `apt-get install libosmesa6` and set MUJOCO_GL=osmesa"
)
# DMC-GB setting -> (common asset file, element, its name, attribute); see its suite/common/settings.py
SETTINGS = {
    "grid_rgb1": ("./common/materials.xml", "texture", "grid", "rgb1"),
    "grid_rgb2": ("./common/materials.xml", "texture", "grid", "rgb2"),
    "grid_markrgb": ("./common/materials.xml", "texture", "grid", "markrgb"),
    "self_rgb": ("./common/materials.xml", "material", "self", "rgba"),
    "skybox_rgb": ("./common/skybox.xml", "texture", "skybox", "rgb1"),
    "skybox_rgb2": ("./common/skybox.xml", "texture", "skybox", "rgb2"),
    "skybox_markrgb": ("./common/skybox.xml", "texture", "skybox", "markrgb"),
}


def make_env(env_id, seed, mode="train", action_repeat=4, frame_stack=3, image_size=84, data_dir=None):
    """A DMC task from pixels in one of MODES; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    for name, value in [("action_repeat", action_repeat), ("frame_stack", frame_stack), ("image_size", image_size)]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    suite = import_suite()
    domain, task = parse_env_id(env_id, suite)
    root = resolve_data_dir(data_dir)
    ensure_data([mode], root)
    # time_limit=inf: the episode is cut by us after 1000 simulator steps (dmc2gym passes 1e6 s for the same)
    dm_env = suite.load(domain, task, task_kwargs={"random": seed, "time_limit": float("inf")})
    return DMCEnv(dm_env, domain, task, seed, mode, action_repeat, frame_stack, image_size, root)


def import_suite():
    """dm_control.suite; importing it loads the OpenGL backend, so a broken renderer fails here."""
    try:
        from dm_control import suite
    except Exception as exc:  # e.g. osmesa without libOSMesa: PyOpenGL fails with AttributeError
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("dm_control"):
            raise  # dm_control itself is missing: not a renderer problem
        raise OSError(renderer_help(exc)) from exc
    return suite


def renderer_help(exc):
    error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return RENDERER_HELP.format(gl=os.environ.get("MUJOCO_GL", ""), error=error)


def parse_env_id(env_id, suite):
    """'walker' -> DMC-GB's task for walker; 'walker-stand' -> any suite task (split at the first '-')."""
    if env_id in TASKS:
        return TASKS[env_id]
    domain, _, task = str(env_id).partition("-")
    if (domain, task) in suite.ALL_TASKS:
        return domain, task
    tasks = sorted(t for d, t in suite.ALL_TASKS if d == domain)
    raise ValueError(
        f"unknown env id {env_id!r}: use a domain for its DMC-GB task ({', '.join(TASKS)}) or domain-task for "
        f"any DMControl suite task, e.g. walker-stand, ball_in_cup-catch"
        + (f" (tasks of {domain}: {', '.join(tasks)})" if tasks else "")
    )


class DMCEnv:
    """One DMC task from pixels with DMC-GB's frame stack, action repeat and test-mode rendering."""

    def __init__(self, dm_env, domain, task, seed, mode, action_repeat, frame_stack, image_size, data_dir):
        self._env, self._physics = dm_env, dm_env.physics
        self.mode, self._repeat, self._size = mode, action_repeat, image_size
        spec = dm_env.action_spec()
        self.action_shape = spec.shape
        self.action_low = -np.ones(spec.shape, np.float32)
        self.action_high = np.ones(spec.shape, np.float32)
        # dmc2gym keeps the true bounds as float32 and maps [-1, 1] onto them in float64
        self._true_low = np.broadcast_to(spec.minimum, spec.shape).astype(np.float32)
        self._true_delta = np.broadcast_to(spec.maximum, spec.shape).astype(np.float32) - self._true_low
        self.observation_shape = (3 * frame_stack, image_size, image_size)
        self.max_episode_steps = -(-EPISODE_LENGTH // action_repeat)  # dmc2gym rounds up
        self._frames = collections.deque(maxlen=frame_stack)
        self._t = None  # agent steps since reset; None before the first reset

        self._colors = load_colors(data_dir / f"{mode}.pt") if mode.startswith("color") else None
        self._color_rng = np.random.RandomState(seed)  # DMC-GB's ColorWrapper owns a RandomState(seed)
        self._color_index = None
        self._video_paths = [data_dir / name for name in required_files(mode)] if mode.startswith("video") else []
        self._video_index = 0  # advanced before use: the first episode gets video 1, as in DMC-GB
        self._videos = collections.OrderedDict()  # video index -> resized frames, least recently used first
        self._video = None
        if mode != "train":
            self._xml, self._assets = domain_model(domain, task)
            check_reload(self._physics, self._xml, edit_assets(self._assets, green_settings(mode)), domain, task)
        check_renderer(self._physics, image_size)

    def reset(self):
        if self._colors is not None:
            self._color_index = self._color_rng.randint(len(self._colors))
            reload_physics(self._physics, self._xml, edit_assets(self._assets, self._colors[self._color_index]))
        if self._video_paths:
            self._video_index = (self._video_index + 1) % len(self._video_paths)
            self._video = self._load_video(self._video_index)
        self._env.reset()
        self._t = 0
        self._frames.extend([self._render()] * self._frames.maxlen)
        return self._observation(), self._info()

    def step(self, action):
        if self._t is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action)
        if action.shape != self.action_shape or not np.all(np.abs(action) <= 1 + ACTION_TOLERANCE):
            got = np.array2string(action.ravel(), max_line_width=10**9, threshold=12)  # one line
            raise ValueError(f"action must have shape {self.action_shape} and values in [-1, 1], got {got}")
        action = np.clip(action.astype(np.float64), -1.0, 1.0)  # a no-op but for a rounding error of a tanh
        action = ((action + 1.0) / 2.0 * self._true_delta + self._true_low).astype(np.float32)  # as dmc2gym
        reward = 0.0
        for _ in range(self._repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            if time_step.last():  # only tasks that end themselves; none of DMC-GB's
                break
        self._t += 1
        self._frames.append(self._render())
        truncated = self._t >= self.max_episode_steps
        return self._observation(), float(reward), bool(time_step.last()), truncated, self._info()

    def get_state(self):
        """Everything this env's future depends on, as tensors, numbers and strings (a weights-only checkpoint
        holds it): set_state on an env made with the same arguments continues it exactly, mid-episode too."""
        physics = np.empty(mujoco.mj_stateSize(self._physics.model.ptr, INTEGRATION_STATE))
        mujoco.mj_getState(self._physics.model.ptr, self._physics.data.ptr, physics, INTEGRATION_STATE)
        return dict(physics=torch.from_numpy(physics), frames=torch.from_numpy(np.stack(self._frames or [np.empty(0)])),
                    t=-1 if self._t is None else self._t, task_random=random_state(self._env.task.random),
                    color_random=random_state(self._color_rng), color_index=-1 if self._color_index is None else self._color_index,
                    video_index=self._video_index)

    def set_state(self, state):
        """Continue from get_state's state; returns the current observation (None before the first reset)."""
        self._env.task.random.set_state(random_state(state["task_random"]))
        self._color_rng.set_state(random_state(state["color_random"]))
        self._color_index = None if state["color_index"] < 0 else state["color_index"]
        if self._color_index is not None:
            reload_physics(self._physics, self._xml, edit_assets(self._assets, self._colors[self._color_index]))
        self._video_index, self._t = state["video_index"], None if state["t"] < 0 else state["t"]
        if self._t is not None:
            self._video = self._load_video(self._video_index) if self._video_paths else None
            self._frames.extend(state["frames"].numpy())
            self._env._reset_next_step = False  # dm_control would otherwise reset at the next step
        mujoco.mj_setState(self._physics.model.ptr, self._physics.data.ptr, state["physics"].numpy(), INTEGRATION_STATE)
        mujoco.mj_step1(self._physics.model.ptr, self._physics.data.ptr)  # dm_control's steps end in mj_step1 too
        return None if self._t is None else self._observation()

    def _render(self):
        frame = self._physics.render(height=self._size, width=self._size, camera_id=0).transpose(2, 0, 1)
        if self._video is not None:
            frame = greenscreen(frame, self._video[self._t % len(self._video)])
        return np.ascontiguousarray(frame)

    def _observation(self):
        return np.concatenate(self._frames, axis=0)

    def _info(self):
        if self._video is not None:
            return {"video": self._video_index, "video_frame": self._t % len(self._video)}
        return {} if self._color_index is None else {"color": int(self._color_index)}

    def _load_video(self, index):
        if index in self._videos:
            self._videos.move_to_end(index)
        else:
            self._videos[index] = load_video(self._video_paths[index], self._size, self.max_episode_steps + 1)
            while len(self._videos) > MAX_CACHED_VIDEOS:
                self._videos.popitem(last=False)
        return self._videos[index]


# ---- scene: colours and green screen ----

def domain_model(domain, task):
    """The domain's default model and common assets, what DMC-GB reloads (<domain>.xml)."""
    try:
        return importlib.import_module(f"dm_control.suite.{domain}").get_model_and_assets()
    except TypeError as exc:  # e.g. swimmer builds its model per task
        raise ValueError(f"test modes need a domain with one fixed model; {domain}-{task} has none ({exc})") from exc


def green_settings(mode):
    """DMC-GB's green screen for video modes (the sky; video_hard also the floor); nothing for other modes."""
    keys = ["skybox_rgb", "skybox_rgb2", "skybox_markrgb"] if mode.startswith("video") else []
    keys += ["grid_rgb1", "grid_rgb2", "grid_markrgb"] if mode == "video_hard" else []
    return {key: GREEN for key in keys}


def edit_assets(assets, settings):
    """A copy of the common assets with DMC-GB's settings applied ({"self_rgb": (r, g, b), ...})."""
    edited, roots = dict(assets), {}
    for key, rgb in settings.items():
        filename, tag, name, attribute = SETTINGS[key]
        root = roots.setdefault(filename, ET.fromstring(assets[filename]))
        values = [str(float(v)) for v in rgb] + (["1"] if attribute == "rgba" else [])  # DMC-GB sets alpha 1
        root.find(f"./asset/{tag}[@name='{name}']").set(attribute, " ".join(values))
    for filename, root in roots.items():
        edited[filename] = ET.tostring(root)
    return edited


def reload_physics(physics, xml, assets):
    """Rebuild the physics in place from xml and assets, keeping its state (DMC-GB's reload_physics)."""
    state = physics.get_state()
    physics.reload_from_xml_string(xml, assets)
    physics.set_state(state)


def check_reload(physics, xml, assets, domain, task):
    """Test modes repaint by reloading the domain's default model (<domain>.xml): the task must be built on it."""
    def sizes(model):
        return model.nq, model.nv, model.nu, model.nbody, model.ngeom

    before, state = sizes(physics.model), physics.get_state()
    physics.reload_from_xml_string(xml, assets)
    if sizes(physics.model) != before:
        raise ValueError(f"test modes need a task built on the default {domain} model; {domain}-{task} is not")
    physics.set_state(state)


def check_renderer(physics, size):
    try:
        physics.render(height=size, width=size, camera_id=0)
    except Exception as exc:
        raise OSError(renderer_help(exc)) from exc


def random_state(state):
    """A RandomState's state as a JSON string, and back."""
    if isinstance(state, str):
        state = json.loads(state)
        state["state"]["key"] = np.array(state["state"]["key"], np.uint32)
        return state
    state = state.get_state(legacy=False)
    return json.dumps({**state, "state": {**state["state"], "key": state["state"]["key"].tolist()}})


def greenscreen(frame, background):
    """DMC-GB's do_green_screen, vectorised: pixels of frame (3, H, W) uint8 whose HSV is green take
    background's. The same float64 operations in the same order as its per-pixel rgb_to_hsv, so the
    result is bit-identical."""
    r, g, b = frame.astype(np.float64) / 255.0
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    grey = maxc == minc  # DMC-GB returns h = s = 0 there: never green
    span = np.where(grey, 1.0, maxc - minc)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h / 6.0) % 1.0 * 360
    s = (maxc - minc) / np.where(grey, 1.0, maxc) * 255
    v = maxc * 255
    green = ~grey
    for value, low, high in zip((h, s, v), HSV_MIN, HSV_MAX):
        green &= (low <= value) & (value <= high)
    return np.where(green, background, frame)


# ---- data: colour tables and videos ----

def load_colors(path):
    """DMC-GB's colour table: a list of dicts of float64 arrays, unpickled by torch's weights-only loader."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    # the files name numpy 1's module path; allow exactly what an ndarray needs, nothing that runs code
    allowed = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def resize_frame(frame, size):
    """(H, W, 3) uint8 -> (3, size, size) uint8 as DMC-GB's _interpolate_bg: /255 in float32, torch's
    bilinear resize (align_corners=False) of the same channels-last layout, *255, truncated. Only torch itself
    reproduces its resize bit for bit everywhere: its CPU kernel fuses multiply-adds on AVX2 machines only.
    The /255 is done in numpy (float32 division rounds the same): torch would split the full-size frame
    across threads, whose wake-ups cost milliseconds per frame next to the renderer's threads."""
    x = torch.from_numpy(np.asarray(frame, np.float32) / np.float32(255)).permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255.0).byte().squeeze(0).numpy()


def load_video(path, size, max_frames):
    """The first max_frames frames of a video, resized one by one (full-size frames are never all in memory)."""
    with imageio.get_reader(path, "ffmpeg") as reader:
        frames = [resize_frame(frame, size) for _, frame in zip(range(max_frames), reader)]
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


# ---- overlay images: the distractors of SGQN's overlay augmentation ----

def overlay_images(folder, n, size, seed):
    """n images to overlay on observations, (n, 3, size, size) uint8: up to n JPEG/PNG images of `folder` (Places365
    reproduces the paper), or, without a folder, procedural ones: no download, but not the paper's distractors."""
    if folder is None:
        return procedural_images(n, size, torch.Generator().manual_seed(seed))
    return load_images(folder, n, size, np.random.default_rng(seed))


def procedural_images(n, size, generator):
    """Images whose amplitude spectrum falls as 1/f, like natural photographs, with random colours."""
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
    """Up to n JPEG/PNG images from folder (recursively), centre-cropped and resized (antialiased bilinear)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise ValueError(f"no JPEG/PNG images in --overlay-dir {folder}; give an image folder or leave it out")
    images = []
    for i in rng.permutation(len(paths))[:n]:
        try:
            pixels = np.atleast_3d(imageio.imread(paths[i]))
        except Exception as e:  # truncated or not an image: imageio's message would blame its plugins
            raise ValueError(f"--overlay-dir: cannot read image {paths[i]} ({type(e).__name__}); remove it") from None
        pixels = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]  # RGB(A) or grey(+alpha)
        img = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).expand(3, -1, -1).float()[None]
        h, w, side = *img.shape[2:], min(img.shape[2:])  # the centre square
        img = img[..., (h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255))
    return torch.cat(images).to(torch.uint8)


def resolve_data_dir(data_dir=None):
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("DMCGB_DATA_DIR"):
        return Path(os.environ["DMCGB_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sgqn" / "dmcgb"


def required_files(mode):
    if mode in NUM_VIDEOS:
        return [f"{mode}/video{i}.mp4" for i in range(NUM_VIDEOS[mode])]
    return [f"{mode}.pt"] if mode.startswith("color") else []


class DataError(FileNotFoundError):
    """DMC-GB files missing or corrupt; the message names each one and the fix."""


def ensure_data(modes, root):
    """Every file the modes need is in root: missing ones are downloaded, and every one is checked against its
    pinned git blob id (re-hashed only when its size or mtime changed since it last verified). One DataError
    names all missing and all corrupt files. DMCGB_VERIFY=0 skips the check (custom or test scenes)."""
    names = [name for mode in dict.fromkeys(modes) for name in required_files(mode)]
    missing = [name for name in names if not (root / name).is_file()]
    reason = download_missing(missing, root) if missing else ""
    missing = [name for name in names if not (root / name).is_file()]
    corrupt = [] if os.environ.get("DMCGB_VERIFY") == "0" else unverified([n for n in names if n not in missing], root)
    if missing or corrupt:
        problems = [f"{len(found)} {what} ({describe(found)})" for what, found in (("missing", missing), ("corrupt", corrupt)) if found]
        raise DataError(
            f"DMC-GB data for {' '.join(dict.fromkeys(modes))} in {root}: {' and '.join(problems)} file(s){reason}; "
            + ("delete the corrupt ones and run again to download them, or " if corrupt else "")
            + f"copy src/env/data of github.com/{DATA_REPO} at commit {DATA_COMMIT} there, or point DMCGB_DATA_DIR at such a copy"
        )


def download_missing(names, root):
    """Download names into root; '' when done, else why not (downloads off, or the error)."""
    if os.environ.get("DMCGB_DOWNLOAD", "1") == "0":
        return " (downloads are off: DMCGB_DOWNLOAD=0)"
    base_url = os.environ.get("DMCGB_URL") or DATA_URL
    print(f"envs: downloading {len(names)} file(s) from {base_url} to {root}", file=sys.stderr)
    try:
        for name in names:
            download(f"{base_url.rstrip('/')}/{name}", root / name, GIT_BLOBS[name])
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as exc:
        return " (download failed: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:200] + ")"
    return ""


def unverified(names, root):
    """The names whose file in root does not have its git blob id; a stamp file remembers what verified."""
    stamp_path = root / ".verified.json"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    bad = []
    for name in names:
        info = os.stat(root / name)
        key = [info.st_size, info.st_mtime_ns]
        if stamp.get(name) != key:
            if git_blob_id(root / name) != GIT_BLOBS[name]:
                bad.append(name)
                continue
            stamp[name] = key
    try:
        tmp = root / f".verified.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, stamp_path)
    except OSError:  # a read-only data folder: hash again next time
        pass
    return bad


def describe(names):
    """['video_hard/video3.mp4', 'video_hard/video4.mp4', 'color_hard.pt'] -> 'video_hard/video{3-4}.mp4, color_hard.pt'."""
    groups = {}  # (prefix, suffix) -> numbers, in order of first appearance
    for name in names:
        prefix, number, suffix = re.fullmatch(r"(.*?)(\d*)(\.\w+)", name).groups()
        groups.setdefault((prefix, suffix), []).append(int(number) if number else None)
    out = []
    for (prefix, suffix), numbers in groups.items():
        if numbers == [None] or len(numbers) == 1:
            out.append(f"{prefix}{numbers[0] if numbers[0] is not None else ''}{suffix}")
            continue
        runs = []
        for n in numbers:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        out.append(prefix + "{" + ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) + "}" + suffix)
    return ", ".join(out)


def download(url, dest, blob_id):
    """Fetch url to a temporary file next to dest; rename it to dest only if its git blob id is blob_id. On failure
    nothing is left behind, not even a folder this made."""
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        got = git_blob_id(tmp)
        if got != blob_id:
            raise OSError(f"download of {url} is corrupt (git blob {got}, expected {blob_id}); nothing was kept")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
        if not dest.exists():
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty


def git_blob_id(path):
    """sha1 of b"blob <size>\\0" + content: the id git gives the file."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# git blob ids of src/env/data at DATA_COMMIT (the files a test mode needs)
GIT_BLOBS = dict(line.split()[::-1] for line in """
49017e0089c32bce39d4e5c9c4a2beca85923be0  color_easy.pt
f13f9f4a1d2200347ca682a0e5192f3987161f6c  color_hard.pt
395dfc08eabfe874a108b433c0d7703836c02e75  video_easy/video0.mp4
9a3ed0afe9ce6797ad6d0b2d677a39daaddb443f  video_easy/video1.mp4
428e34e4a633e4b031754c4be13c767df19a5273  video_easy/video2.mp4
7d45d4ccd267b16e5dce26dfab4a8b4226d21829  video_easy/video3.mp4
0e2a715197016e496fbefb7514c405d7bc17f26e  video_easy/video4.mp4
f3fe1f241ab7049aa63f5f262e622d5b0088fa72  video_easy/video5.mp4
2754c85ac9fd0e9e38f3286c160850c586031042  video_easy/video6.mp4
dae7c72381ece9a1a0ec7ad579d761b0384a3236  video_easy/video7.mp4
51a5f69e2bb267df29d141ecac3b2f2dadba79c8  video_easy/video8.mp4
eb4f7fa46b0f2b8bc06fd24068433441b50dcc06  video_easy/video9.mp4
cce1c7ffd8092e4338c91bc99dd0f25d92577106  video_hard/video0.mp4
6c70a60e0a81dda4d7296a60dcd64112805ba4fa  video_hard/video1.mp4
e564c88d4dc8206c680763503ee20b55b14995c0  video_hard/video2.mp4
7e8eb386fd11d064e04602e4d748aa2d06a73928  video_hard/video3.mp4
8d6f81966268993276d114ca4e6ea7d1768139c0  video_hard/video4.mp4
954b9dbccf415dc7775cc148d8baa89363bb6701  video_hard/video5.mp4
9da29c0e5dba40836519cc574b677f3228c48698  video_hard/video6.mp4
e74e51c6fb42a4c8fb66249a9b9730be85834e80  video_hard/video7.mp4
5f325a395f5916dd57b5fe414e04f0e067efa816  video_hard/video8.mp4
69ff278626c8fb038b90275b66df2ef8ca426395  video_hard/video9.mp4
0f8f8a5683201b76eb12d2af72994d9f0d1f28cf  video_hard/video10.mp4
91f66d404f0fe377aee395f132d0e0b7513a555c  video_hard/video11.mp4
b38f072877f512d61d7d798594194d5e6c2812f2  video_hard/video12.mp4
610d0a335d309c25ccbe65794b79c6d2ec877403  video_hard/video13.mp4
fda005c2ea7022e066c62a112ad7f3a8e61bb921  video_hard/video14.mp4
d5b0754cce95c61024b9ab5440db776a491bceb9  video_hard/video15.mp4
e8bb254b451833d0f17ea1d1686651a7310c221a  video_hard/video16.mp4
7f9e5c44093a8e75c20c2775883ee3e1f990cdf5  video_hard/video17.mp4
5b87cb66445ecac8562c6a82f243c2b8bfa1d345  video_hard/video18.mp4
44f8d5b897fbe3746718a5cf3e579b7e95877a54  video_hard/video19.mp4
94b803f1af0fae68042ade89595201440bcc9219  video_hard/video20.mp4
f70802734663ad6bae83613c8cc7b3607eabe1cf  video_hard/video21.mp4
853f6d73dd6f5d965d83058196226c3de557b518  video_hard/video22.mp4
8ad27b107956d4a216f598efd9bb169e6308fae2  video_hard/video23.mp4
727c30ad507b78347bc04462e64ba4dad3760d46  video_hard/video24.mp4
92d5abd0442fdab52f473aefdaecf45ce6839c15  video_hard/video25.mp4
a16ca15dccd1366571b5d110c8f932f1563594b0  video_hard/video26.mp4
757dc546611d87a9ce0c86d0e13333ad3c6b99bb  video_hard/video27.mp4
5c8e7654fcb7ca81af620b502739888d49800252  video_hard/video28.mp4
e860e3ac3bb9814040d2d3dba52cb04ed02bcb7a  video_hard/video29.mp4
d4f268eeed6ed712c1a278054b27acc10410ab2c  video_hard/video30.mp4
8da17fd7733bcd81798639e41c880d3873dc5519  video_hard/video31.mp4
773624486fe700d9ced18feaeebe65de1e766da2  video_hard/video32.mp4
b830ffba3c9dc1a119576942f595db5f5f24d8ef  video_hard/video33.mp4
b6a106c1c72444ca97dad0dd4bf698716f89fed1  video_hard/video34.mp4
5dcc8154153a1d5a8632fb5b50087e344ee1c77b  video_hard/video35.mp4
8fb2af447a27cee688932b328117937c98e5d3f4  video_hard/video36.mp4
23c1277a7aef34160e837e8afb8527e3fa7241db  video_hard/video37.mp4
5d4ad99642df4393fa65c79e693f723ba5ceeeba  video_hard/video38.mp4
c099456384483e6463457b0bb9811eb1f8676125  video_hard/video39.mp4
2c6c07c0fcd14c7138e95ed866a37e90e1db9d67  video_hard/video40.mp4
7eda26a52baed1e000c0f1c72877614eadb5c777  video_hard/video41.mp4
8d8cc0240938032cdfc20a9ed0aa5b74c373926d  video_hard/video42.mp4
6fe02cdf0a95bb0a9f98e47381ead2170a7a00af  video_hard/video43.mp4
0d8ed5d05efa899d9e1ce5655fe76d91245abd63  video_hard/video44.mp4
d68db7dbc18f4dd7a59be45eabf86375da6dd29c  video_hard/video45.mp4
99dd6ec8ee45f599131fa6a506db4aa38bdb6058  video_hard/video46.mp4
893c100f9f84053248094c95976bbc76bf219f28  video_hard/video47.mp4
583b65e07f1d93693a3ba12f5e905e7636d5313b  video_hard/video48.mp4
6f2132c8c5ac4651302b928d494c4b19892f778e  video_hard/video49.mp4
614a30cf42d0492b6b88216d0e21d440c38f9fbd  video_hard/video50.mp4
aa5b91849d67e6f92d0298e4e93c5ef87c73cda0  video_hard/video51.mp4
552162ff5c6262f0a2db5fd88b5af39761e99391  video_hard/video52.mp4
584afaa2eaad0221c8564a4c97172561e511b736  video_hard/video53.mp4
63412034ad6d020da01fcc1a45c366f05bb9d8dc  video_hard/video54.mp4
e6356d3fc3bc62f71cf793277ea45cd236c3fad4  video_hard/video55.mp4
bae53c60c3557b9a8f3953287e7adf285f05bb8e  video_hard/video56.mp4
9cbb1aa99d91f596f69ab35377a72b29a9837521  video_hard/video57.mp4
c36a2276a665a458b09215c9cdeb604923c9db92  video_hard/video58.mp4
fad194d8a5505cfa8b48b183465323881ff1e246  video_hard/video59.mp4
12e29e87181981b056e43d3ec293c8610f36ca28  video_hard/video60.mp4
33058ca89fbb969166acf931bb77abfb88581128  video_hard/video61.mp4
52455f234b510b25d9eaa93c4f03bf79fad7c1ea  video_hard/video62.mp4
1465ee181bd078e55f63fcb64044fab5d4c73f7b  video_hard/video63.mp4
2a53b98aac944124a6f597bbeac209e7bc5b55c0  video_hard/video64.mp4
356c96a343ce1be3b717316585c7a8da707854d9  video_hard/video65.mp4
f1bc360df3d1eb9c41ad1bfc2008b93f0588eeb6  video_hard/video66.mp4
a133341b735670479dfd77f10c6a6abea87dd498  video_hard/video67.mp4
297987cedc5c8789827b38d9149a7debe439580a  video_hard/video68.mp4
69b6a3bae53b7276769347ec0d4a963702462eaf  video_hard/video69.mp4
bdb3cc23716651f3bb270a0f74ca45ab342e8212  video_hard/video70.mp4
190968b5aaddb7c7a8593e00b1b9f8c473960473  video_hard/video71.mp4
21c69587df387435cb92d0015a2d21ea3aca7d11  video_hard/video72.mp4
ce350ff12dfd742ebb2bcd171e2418fdd66b3b36  video_hard/video73.mp4
7a7d1ba023bd2b079e8bcc54adb09ad0a76e1b49  video_hard/video74.mp4
7510200f0a2ee2d5a896722a9c6be91f65b56a41  video_hard/video75.mp4
533a54265e27d108b77d68cf8b06fd69757f8c1d  video_hard/video76.mp4
0de8222512ccb9ded75f3bd944121064536b848f  video_hard/video77.mp4
b4b9d296319b19a774741627fc16a11929312738  video_hard/video78.mp4
c4c2dd96dd094d9b471b08e506d2d10a0eaf45b5  video_hard/video79.mp4
648e780702c46c0f4a035619910b291dcc6fe460  video_hard/video80.mp4
61a56320bd0baf82b93c6ebfdee4e572e9621042  video_hard/video81.mp4
b1020246786e629d1d8333ca1dea7054613c3222  video_hard/video82.mp4
1e509baa4d086e3d2ec1cbba918256fcb21f863d  video_hard/video83.mp4
b1e7ca8585941dd388dfa4608d11c8f0535cad2d  video_hard/video84.mp4
833dc6bfd9045459d1cd7852059915edc5b3a811  video_hard/video85.mp4
50573fc599c81ee31a9e484a9c4d005f2a0250ff  video_hard/video86.mp4
5073d1a63cc0eb118d16e3266f93a4a4fee43f34  video_hard/video87.mp4
6768c35beb8b52470b91865a46e5032902d75160  video_hard/video88.mp4
47f985126eacd77b1610c966cd146bb2043e386e  video_hard/video89.mp4
c772678999aa8fff6a962588765d93686dce4781  video_hard/video90.mp4
a4e60e9801787f140aec06be9c8786494e9fbcab  video_hard/video91.mp4
3356ce78a0c1f799fad62d299c27aeb86ef01cff  video_hard/video92.mp4
37b3845d84d1e6914bbacbb8def3185d05d2ac47  video_hard/video93.mp4
98398a8f2b386ffc24fd87b6b23efe3bcd0b5660  video_hard/video94.mp4
7cfa24b51438f364bfe3666692d606ce53b860d4  video_hard/video95.mp4
8615f2a81b95288886eca37e086d9b2dae2e6319  video_hard/video96.mp4
60573f04b111d72dbb96f41a565f8fe169fcb026  video_hard/video97.mp4
1b492f63e8b61fa1830bff7b0958e7d18684f2d5  video_hard/video98.mp4
a7413bc08d0e7285941999488eac4ed7afb84d26  video_hard/video99.mp4
""".strip().splitlines())
