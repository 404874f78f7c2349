"""The README's picture: where SAC and SG-SAC look on an unseen scene, every seed side by side (not a test).

    python benchmarks/saliency_figure.py docs/runs/learning-seed1 docs/runs/learning-seed2 docs/runs/learning-seed3 \
        --mode video_hard --out docs/saliency_sac_vs_sgsac_video_hard.png

Each folder is one learning.py output folder (one SAC and one SG-SAC run of the same seed). sgqn.py leaves in each run
folder saliency_<mode>.png from its final evaluation: an evaluation frame | guided-backprop map | saliency mask |
decoder's predicted mask, at 2x, a row per frame of the observation (older runs) or the newest frame only (now).
The figure takes each run's newest-frame row: a row per folder, SAC left, SG-SAC right.
Needs matplotlib: pip install -r benchmarks/requirements.txt.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import tyro

ROW = 2 * 84  # sgqn.py writes its saliency pictures at 2x


@dataclass
class Figure:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """learning.py output folders, one per seed"""
    mode: str = "video_hard"
    """the evaluation mode whose saliency pictures to show"""
    out: str = "saliency.png"
    """the PNG to write"""


def newest_frame_row(picture):
    """The last row of a saliency picture (H, 4 * ROW, 3): the observation's newest frame."""
    return picture[-ROW:]


def run_picture(folder, algorithm, mode):
    runs = [d for d in Path(folder).iterdir() if d.is_dir() and (d.name.split("__") + [""])[1] == algorithm]
    if len(runs) != 1 or not (runs[0] / f"saliency_{mode}.png").is_file():
        sys.exit(f"error: {folder} has no single {algorithm} run with saliency_{mode}.png; give learning.py output folders")
    return runs[0], newest_frame_row(iio.imread(runs[0] / f"saliency_{mode}.png"))


def main(figure):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(figure.folders), 2, figsize=(11, 1.9 * len(figure.folders) + 0.6), squeeze=False)
    for folder, row in zip(figure.folders, axes):
        for algorithm, label, ax in zip(("sac", "sgsac"), ("SAC", "SG-SAC"), row):
            run, picture = run_picture(folder, algorithm, figure.mode)
            seed = run.name.split("__seed")[1].split("__")[0]
            ax.imshow(picture)
            ax.set_title(f"{label}, seed {seed}", fontsize=10)
            ax.set_xticks([ROW * (i + 0.5) for i in range(4)], ["frame", "attribution", "mask", "predicted mask"], fontsize=8)
            ax.set_yticks([])
    fig.suptitle(f"Unseen {figure.mode} scene, final checkpoints (predicted mask: SG-SAC's decoder; plain SAC has none)", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure.out, dpi=100)
    print(f"figure written to {figure.out}")


if __name__ == "__main__":
    main(tyro.cli(Figure))
