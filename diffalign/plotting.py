"""PNG outputs: image grids and metric curves; animated grids of videos (MP4, or GIF without imageio-ffmpeg)."""

import importlib.util
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """`(N, 3, H, W)` in [0, 1] -> one PIL image, `nrow` images per row, nearest-neighbour upscaled by `scale`; of
    `(N, 4, H, W)` (an RGBA pipeline's: QwenImage 2.1's) the RGB channels."""
    images = images[:, :3]
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    grid = np.full((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = array[i]
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


# frames per second of written videos: Wan 2.1's (diffusers' examples export its videos at 16 fps)
VIDEO_FPS = 16


def video_grid(videos: torch.Tensor, nrow: Optional[int] = None, padding: int = 2,
               scale: int = 1) -> List[Image.Image]:
    """`(N, F, 3, H, W)` videos in [0, 1] -> `F` PIL frames, frame `f` the `image_grid` of every video's frame `f`."""
    return [image_grid(videos[:, f], nrow=nrow, padding=padding, scale=scale) for f in range(videos.shape[1])]


def mp4_available() -> bool:
    """Whether MP4 can be written: imageio and imageio-ffmpeg (the `video` extra, diffusers' `export_to_video`
    backend) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg"))


def video_extension() -> str:
    """The extension `save_video` writes: `mp4`, or `gif` without imageio-ffmpeg."""
    return "mp4" if mp4_available() else "gif"


def pad_to_multiple(frame: Image.Image, multiple: int = 16) -> Image.Image:
    """`frame` with white added right and below to a size divisible by `multiple` (video codecs' macro blocks)."""
    width, height = (math.ceil(size / multiple) * multiple for size in frame.size)
    if (width, height) == frame.size:
        return frame
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(frame, (0, 0))
    return canvas


def save_video(frames: List[Image.Image], path: str, fps: int = VIDEO_FPS) -> str:
    """Writes `frames` to `path` with the extension of `video_extension()` (the one `path` has is replaced) and
    returns the path written. MP4 as diffusers' `export_to_video` writes it (imageio + imageio-ffmpeg, quality 5,
    sizes padded white to multiples of 16 rather than rescaled); else an endlessly looping GIF as its `export_to_gif`
    (PIL)."""
    path = f"{os.path.splitext(path)[0]}.{video_extension()}"
    frames = [frame.convert("RGB") for frame in frames]
    if path.endswith(".mp4"):
        import imageio

        with imageio.get_writer(path, fps=fps, quality=5.0, macro_block_size=16) as writer:
            for frame in frames:
                writer.append_data(np.asarray(pad_to_multiple(frame)))
    else:
        frames[0].save(path, save_all=True, append_images=frames[1:], optimize=False, duration=1000 // fps, loop=0)
    return path


def gif_bytes(frames: List[Image.Image], fps: int = VIDEO_FPS) -> bytes:
    """`frames` as the bytes of an endlessly looping GIF (what TensorBoard's image plugin animates)."""
    import io

    buffer = io.BytesIO()
    frames = [frame.convert("RGB") for frame in frames]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], optimize=False,
                   duration=1000 // fps, loop=0)
    return buffer.getvalue()


def read_video(path: str) -> List[Image.Image]:
    """The RGB frames of a video written by `save_video` (MP4 through imageio, GIF through PIL)."""
    if path.endswith(".mp4"):
        import imageio

        with imageio.get_reader(path) as reader:
            return [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in reader]
    from PIL import ImageSequence

    with Image.open(path) as video:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]


def find_video(path: str) -> Optional[str]:
    """The video `save_video(frames, path)` wrote (`.mp4` or `.gif` beside `path`'s stem), if any."""
    stem = os.path.splitext(path)[0]
    return next((f"{stem}.{ext}" for ext in ("mp4", "gif") if os.path.isfile(f"{stem}.{ext}")), None)


def labelled_rows(grids: List[Image.Image], labels: List[str], label_width: int = 90) -> Image.Image:
    """Stacks grids vertically with a text label to the left of each."""
    width = label_width + max(g.width for g in grids)
    height = sum(g.height for g in grids)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for grid, label in zip(grids, labels):
        canvas.paste(grid, (label_width, top))
        draw.text((4, top + grid.height // 2 - 6), label, fill="black")
        top += grid.height
    return canvas


def grid_scale(image_size: int) -> int:
    """Upscale factor so small images (e.g. 32 px digits) are visible in a grid."""
    return max(1, 128 // image_size)


def fit_width(image: Image.Image, width: int) -> Image.Image:
    """`image` resized to `width` pixels wide, keeping its aspect ratio (nearest-neighbour up, Lanczos down)."""
    if image.width == width:
        return image
    height = max(1, round(image.height * width / image.width))
    return image.resize((width, height), Image.NEAREST if width > image.width else Image.LANCZOS)


def rows_grid(rows: List[torch.Tensor], labels: List[str], max_per_row: int = 8, max_tile: int = 256,
              padding: int = 2) -> Image.Image:
    """One labelled row per tensor `(N, 3, H, W)`, showing its first `max_per_row` images.

    Each image is shown `max_tile` pixels wide at most (small images are upscaled to ~128 px, see `grid_scale`), so the
    picture stays a size people can open: about `90 + max_per_row * max_tile` pixels wide at most.
    """
    width = rows[0].shape[-1]
    tile = min(width * grid_scale(width), max_tile)
    grids = []
    for images in rows:
        images = images[:max_per_row]
        grid = image_grid(images, nrow=len(images), padding=padding)
        grids.append(fit_width(grid, round(grid.width * tile / width)))
    return labelled_rows(grids, labels)


def reward_band(records: List[Dict]):
    """`(epochs, low, high)`: the band mean +- std of the epochs' rewards, clipped to each epoch's observed min and max
    (mean +- std of a bounded reward, a probability, passes its bounds), or None without `reward_std`."""
    rows = [r for r in records if r.get("reward_mean") is not None]
    if not rows or not all(r.get("reward_std") is not None for r in rows):
        return None
    mean = np.array([r["reward_mean"] for r in rows], dtype=float)
    std = np.array([r["reward_std"] for r in rows], dtype=float)
    low, high = mean - std, mean + std
    if all(r.get("reward_min") is not None and r.get("reward_max") is not None for r in rows):
        low = np.maximum(low, [r["reward_min"] for r in rows])
        high = np.minimum(high, [r["reward_max"] for r in rows])
    return [r["epoch"] for r in rows], low, high


def plot_metrics(records: List[Dict], keys: Sequence[str], path: str, title: str = ""):
    """Line plot of `keys` against `epoch`, one panel per key, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["epoch"], r[key]) for r in records if key in r and r[key] is not None]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o", markersize=2.5)
            band = reward_band(records) if key == "reward_mean" else None
            if band is not None:
                ax.fill_between(*band, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def clipped_error_bars(means: Sequence[float], stds: Sequence[float], lows: Sequence[float],
                       highs: Sequence[float]):
    """`(below, above)`: the lengths of `mean -+ std` error bars cut at `[low, high]`, the range of the rewards they
    summarise, so that a bar never claims a value the reward cannot take (a probability's bar stays in [0, 1]).

    Lengths are never negative (a mean outside its range, from rounding, gets a zero-length side)."""
    below = [max(0.0, min(std, mean - low)) for mean, std, low in zip(means, stds, lows)]
    above = [max(0.0, min(std, high - mean)) for mean, std, high in zip(means, stds, highs)]
    return below, above
