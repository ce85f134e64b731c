"""Prompt sources: a list, a file, a built-in set, or a user's `module:function`."""

import csv
import importlib
import json
import os
import random
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .errors import PromptError, first_line

# DDPO's `simple_animals` set (kvablack/ddpo-pytorch, assets/simple_animals.txt), used by PRDP's small-scale runs.
SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle "
    "ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig turkey fly "
    "llama camel bat gorilla hedgehog kangaroo"
).split()


def _digit_word_prompts() -> List[str]:
    from diffalign.rewards.digits import DIGIT_WORDS

    return [f"a handwritten digit {word}" for word in DIGIT_WORDS]


def _all_digit_prompts() -> List[str]:
    from diffalign.rewards.digits import digit_prompts

    return digit_prompts()


BUILTIN_PROMPTS = {
    "digits": _digit_word_prompts,
    "digits_all": _all_digit_prompts,  # every phrasing the bundled model was trained on (80 prompts)
    "simple_animals": lambda: [f"a painting of a {animal}" for animal in SIMPLE_ANIMALS],
}


class PromptSource:
    """Draws each epoch's prompts reproducibly from `(seed, epoch)`, so every process and a resumed run agree.

    Each prompt may carry a metadata dict (the other fields of its row in a JSONL/CSV file or dataset, e.g. GenEval's
    `tag` and `include`), which travels with it to the reward (`reward(images, prompts, metadata)`). A prompt function
    returns a prompt, or `(prompt, metadata)` as ddpo-pytorch's prompt functions do.
    """

    def __init__(self, prompts: Optional[List[str]] = None, fn: Optional[Callable[[], str]] = None,
                 metadata: Optional[List[dict]] = None):
        if not prompts and fn is None:
            raise PromptError("no prompts: give `prompts`, `prompt_file`, `prompt_dataset` or `prompt_fn`")
        self.prompts = list(prompts or [])
        self.fn = fn
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise PromptError(f"{len(self.metadata)} metadata rows for {len(self.prompts)} prompts")

    def epoch_items(self, epoch: int, num_prompts: int, seed: int,
                    weights: Optional[np.ndarray] = None) -> List[Tuple[str, dict]]:
        """`num_prompts` `(prompt, metadata)` pairs for `epoch`: uniform draws (without replacement while the list
        allows), or, with `weights` (one per listed prompt), weighted draws with replacement."""
        if weights is not None:
            if self.fn is not None:
                raise PromptError("weighted prompt selection needs a prompt list, not a prompt function")
            rng = np.random.default_rng([seed, epoch])
            index = rng.choice(len(self.prompts), size=num_prompts, replace=True, p=weights / weights.sum())
            return [self._item(i) for i in index]
        if self.fn is not None:
            state = random.getstate()
            random.seed(seed * 1_000_003 + epoch)
            try:
                return [self._call_fn() for _ in range(num_prompts)]
            finally:
                random.setstate(state)
        rng = np.random.default_rng([seed, epoch])
        index = rng.choice(len(self.prompts), size=num_prompts, replace=num_prompts > len(self.prompts))
        return [self._item(i) for i in index]

    def epoch_prompts(self, epoch: int, num_prompts: int, seed: int, weights: Optional[np.ndarray] = None) -> List[str]:
        """The prompts of `epoch_items`."""
        return [prompt for prompt, _ in self.epoch_items(epoch, num_prompts, seed, weights)]

    @property
    def is_list(self) -> bool:
        return self.fn is None

    def grid_items(self, num_prompts: int, seed: int) -> List[Tuple[str, dict]]:
        """Fixed `(prompt, metadata)` pairs for grids and evaluations: the list in order (cycled), or fixed draws
        from the function."""
        if self.fn is not None:
            return self.epoch_items(2**31, num_prompts, seed)
        return [self._item(i % len(self.prompts)) for i in range(num_prompts)]

    def grid_prompts(self, num_prompts: int, seed: int) -> List[str]:
        """The prompts of `grid_items`."""
        return [prompt for prompt, _ in self.grid_items(num_prompts, seed)]

    def _item(self, index) -> Tuple[str, dict]:
        return self.prompts[index], self.metadata[index]

    def _call_fn(self) -> Tuple[str, dict]:
        result = self.fn()
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
            return str(result[0]), result[1]
        return str(result), {}


class PromptDifficulty:
    """Recent rewards per prompt, and sampling weights that favour prompts of moderate difficulty.

    A prompt's weight is the spread (std) of its last `buffer_size` rewards: policy-gradient and reward-difference
    updates learn only from reward differences between samples of the same prompt, so a prompt that every sample
    already solves (or that none does) teaches nothing and is drawn less. Prompts with fewer than `min_count` rewards
    get the largest weight seen (they are explored first), and every weight is at least `floor` x the largest, so no
    prompt is dropped for good and the estimates stay fresh.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 4, floor: float = 0.1):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.floor = floor
        self.rewards: Dict[str, List[float]] = {}

    def record(self, prompts: List[str], rewards) -> None:
        for prompt, reward in zip(prompts, np.asarray(rewards, dtype=np.float64).reshape(-1).tolist()):
            if np.isfinite(reward):
                buffer = self.rewards.setdefault(prompt, [])
                buffer.append(reward)
                del buffer[: -self.buffer_size]

    def weights(self, prompts: List[str]) -> np.ndarray:
        spread = np.array([np.std(self.rewards[p]) if len(self.rewards.get(p, ())) >= self.min_count else np.nan
                           for p in prompts])
        known = spread[np.isfinite(spread)]
        top = known.max() if known.size and known.max() > 0 else 1.0
        spread = np.where(np.isfinite(spread), spread, top)
        return np.maximum(spread, self.floor * top)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "floor": self.floor,
                "rewards": {p: list(r) for p, r in self.rewards.items()}}

    def load_state_dict(self, state: dict):
        self.buffer_size, self.min_count, self.floor = state["buffer_size"], state["min_count"], state["floor"]
        self.rewards = {p: list(r) for p, r in state["rewards"].items()}


# ------------------------------------------------------------------------------------------- condition images
class ConditionedPrompt(str):
    """A prompt's text with the condition images an editing model starts from (`condition_images`: absolute paths),
    the condition videos a video-to-video model starts from (`condition_videos`, a row's `video` / `videos`;
    `ModelFamily.max_condition_videos`: `wan_v2v` takes one) and the last frame a first-last-frame video model ends
    on (`last_image`, a row's `last_image`: Wan 2.1 FLF2V; absolute path or None).

    It is the text everywhere a prompt is text (the text encoders, logs, JSON), so a prompt carries its images
    through the epoch's draw, the rollout and the recorded trajectories without another argument; the families that
    take images read them with `condition_images_of`. Equality and hashing take the images too: the same instruction
    on two images is two prompts, in the conditioning cache (`prompt_key`) and in the per-prompt reward groups and
    statistics (DDPO's tracker, NFT's and GRPO's groups, `PromptDifficulty`)."""

    def __new__(cls, text: str, condition_images: Tuple[str, ...] = (), condition_videos: Tuple[str, ...] = (),
                last_image: Optional[str] = None):
        prompt = super().__new__(cls, text)
        prompt.condition_images = tuple(condition_images)
        prompt.condition_videos = tuple(condition_videos)
        prompt.last_image = last_image
        return prompt

    def __eq__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return (str.__eq__(self, other) and self.condition_images == condition_images_of(other)
                and self.condition_videos == condition_videos_of(other) and self.last_image == last_image_of(other))

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        if self.last_image is not None:
            return hash((str(self), self.condition_images, self.condition_videos, self.last_image))
        if self.condition_videos:
            return hash((str(self), self.condition_images, self.condition_videos))
        return hash((str(self), self.condition_images))  # an image prompt's hash as before videos existed

    def __repr__(self) -> str:
        videos = f", condition_videos={self.condition_videos!r}" if self.condition_videos else ""
        last = f", last_image={self.last_image!r}" if self.last_image is not None else ""
        return f"ConditionedPrompt({str(self)!r}, condition_images={self.condition_images!r}{videos}{last})"


def condition_images_of(prompt) -> Tuple[str, ...]:
    """The condition image paths of a prompt (empty for a text prompt)."""
    return getattr(prompt, "condition_images", ())


def condition_videos_of(prompt) -> Tuple[str, ...]:
    """The condition video paths of a prompt (empty for a prompt without)."""
    return getattr(prompt, "condition_videos", ())


def last_image_of(prompt) -> Optional[str]:
    """The last-frame image path of a prompt (None for a prompt without)."""
    return getattr(prompt, "last_image", None)


def prompt_key(prompt):
    """The conditioning cache's key of a prompt: its text, and its condition images (and videos, and last frame)
    when it has any (the same edit instruction on two images is two conditionings)."""
    images, videos = condition_images_of(prompt), condition_videos_of(prompt)
    if last_image_of(prompt) is not None:
        return str(prompt), images, videos, last_image_of(prompt)
    if videos:
        return str(prompt), images, videos
    return (str(prompt), images) if images else prompt


def check_condition_image(path: str, where: str):
    """A one-line `PromptError` unless `path` is an image file PIL can read (its header and data are checked; the
    pixels are decoded later, once, by the family)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise PromptError(f"{where}: condition image '{path}' {problem}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise PromptError(f"{where}: condition image '{path}' is not a readable image ({first_line(e)})") from None


def check_condition_video(path: str, where: str):
    """A one-line `PromptError` unless `path` is a video file imageio reads (its first frame is decoded: MP4 through
    imageio-ffmpeg, GIF through PIL, as `diffalign.plotting.read_video`)."""
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise PromptError(f"{where}: condition video '{path}' {problem}")
    import imageio

    try:
        with imageio.get_reader(path) as reader:
            reader.get_data(0)
    except Exception as e:  # imageio's plugins raise OSError, ValueError, RuntimeError, IndexError...
        raise PromptError(f"{where}: condition video '{path}' is not a readable video ({first_line(e)})") from None


def load_condition_video(path: str):
    """A condition video as a float tensor `(F, 3, H, W)` in [0, 1], the layout of a video reward's samples: for a
    reward that compares the input (`metadata["video"]`, a path) with the output."""
    import imageio
    import torch

    with imageio.get_reader(path) as reader:
        frames = [np.asarray(frame)[..., :3] for frame in reader]
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def load_condition_image(path: str):
    """A condition image as an RGB `PIL.Image` (what the families preprocess)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_condition_tensor(path: str):
    """A condition image as a float tensor `(3, H, W)` in [0, 1], the layout of the images a reward scores: for an
    edit reward that compares the input (`metadata["image"]`, a path) with the output."""
    import torch

    array = np.asarray(load_condition_image(path), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _condition_paths(row: dict, base: str, where: str, single: str = "image") -> Tuple[str, ...]:
    """The absolute paths of a row's `image` / `images` field (`single="video"`: `video` / `videos`; relative paths
    are relative to `base`), checked."""
    plural = f"{single}s"
    if single in row and plural in row:
        raise PromptError(f"{where} has both '{single}' and '{plural}': give one")
    if single in row:
        value = row[single]
        if not isinstance(value, str) or not value.strip():
            raise PromptError(f"{where}: '{single}' must be a non-empty path; got {value!r}")
        names = [value]
    else:
        value = row[plural]
        if (not isinstance(value, list) or not value
                or not all(isinstance(name, str) and name.strip() for name in value)):
            raise PromptError(f"{where}: '{plural}' must be a non-empty list of paths; got {value!r}")
        names = value
    paths = tuple(os.path.abspath(os.path.join(base, os.path.expanduser(name.strip()))) for name in names)
    check = check_condition_video if single == "video" else check_condition_image
    for path in paths:
        check(path, where)
    return paths


def attach_condition_images(prompts: List[str], metadata: List[dict], path: str,
                            empty_cell_is_none: bool = False) -> Tuple[List[str], List[dict]]:
    """Prompts of a JSONL/CSV prompt file at `path` whose rows name condition images (`image`, or `images` for
    models that take several) or condition videos (`video` / `videos`) as `ConditionedPrompt`s, and their metadata
    with them as absolute paths (`image` / `video` a string, `images` / `videos` a list, as in the file): a reward
    gets the paths (`load_condition_tensor` reads an image, `load_condition_video` a video).

    A row's `last_image` (a first-last-frame video model's last frame, Wan 2.1 FLF2V; with an `image`, the first)
    is read the same way (`ConditionedPrompt.last_image`, `metadata["last_image"]`).

    Paths are relative to the prompt file's folder (Flow-Factory's and Flow-GRPO's convention); every image and
    video is checked now, before any model loads: a missing or unreadable one is a one-line `PromptError`. With
    `empty_cell_is_none` (a CSV, whose rows all have every column), an empty `image` / `video` / `last_image` cell
    means none."""
    base = os.path.dirname(os.path.abspath(path))
    out_prompts, out_metadata = [], []
    for number, (prompt, row) in enumerate(zip(prompts, metadata), start=1):
        for single in ("image", "video", "last_image"):
            if empty_cell_is_none and isinstance(row.get(single), str) and not row[single].strip():
                row = {k: v for k, v in row.items() if k != single}  # a CSV row without an image / a video
        where = f"prompt file '{path}' row {number}"
        conditions = {}
        for single in ("image", "video"):
            if single in row or f"{single}s" in row:
                paths = _condition_paths(row, base, where, single)
                conditions[single] = paths
                row = {**row, **({single: paths[0]} if single in row else {f"{single}s": list(paths)})}
        last_image = None
        if "last_image" in row:
            if "image" not in conditions:
                raise PromptError(f"{where} has a 'last_image' but no 'image': a first-last-frame model starts from "
                                  f"the 'image'")
            last_image = _condition_paths({"last_image": row["last_image"]}, base, where, "last_image")[0]
            row = {**row, "last_image": last_image}
        if conditions:
            prompt = ConditionedPrompt(prompt, conditions.get("image", ()), conditions.get("video", ()), last_image)
        out_prompts.append(prompt)
        out_metadata.append(row)
    return out_prompts, out_metadata


def check_condition_prompts(prompts: List[str], family_name: str, max_images: int, what: str = "prompt",
                            required: bool = False, max_videos: int = 0, videos_required: bool = False,
                            takes_last_image: bool = False):
    """A one-line `PromptError` when a prompt has more condition images than the model takes (`max_images`; 0 for
    a text-to-image model), when prompts with and without condition images are mixed (an editing model samples
    a prompt without one text-to-image, with another token count: they cannot share a batch), with `required`
    (a model that cannot sample without one: Qwen-Image-Edit) when a prompt has none, when a prompt has more
    condition videos than the model takes (`max_videos`: 0 but for video-to-video, `wan_v2v`), with
    `videos_required` (video-to-video) when a prompt has no condition video, or when a prompt has a `last_image` and
    the family takes none (`takes_last_image`: Wan image-to-video's FLF2V models do)."""
    with_images = without = None
    for prompt in prompts:
        if last_image_of(prompt) is not None and not takes_last_image:
            raise PromptError(f"{what} '{prompt}' has a 'last_image', but a {family_name} model takes no last frame "
                              f"(Wan 2.1 FLF2V image-to-video models do)")
        videos = len(condition_videos_of(prompt))
        if videos > max_videos:
            takes = "no condition videos (only video-to-video models, wan_v2v, do)" if max_videos == 0 \
                else f"at most {max_videos}"
            raise PromptError(f"{what} '{prompt}' has {videos} condition video(s), but a {family_name} model takes "
                              f"{takes}")
        if videos_required and not videos:
            raise PromptError(f"{what} '{prompt}' has no condition video, but a {family_name} model starts from one: "
                              "give every prompt a 'video'")
        count = len(condition_images_of(prompt))
        if required and not count:
            raise PromptError(f"{what} '{prompt}' has no condition image, but a {family_name} model edits one: give "
                              "every prompt an 'image'")
        if count > max_images:
            takes = "no condition images (a text-to-image model)" if max_images == 0 else f"at most {max_images}"
            raise PromptError(f"{what} '{prompt}' has {count} condition image(s), but a {family_name} model takes "
                              f"{takes}")
        if count:
            with_images = with_images or prompt
        else:
            without = without if without is not None else prompt
    if with_images is not None and without is not None:
        raise PromptError(f"the {what}s mix prompts with and without a condition image ('{without}' has none, "
                          f"'{with_images}' has one): give every prompt an 'image', or none")


# The trainer sets each sample's `group_id` in the reward's metadata (the prompt slot of its group).
RESERVED_METADATA = ("group_id",)


def check_prompt_path(path: str, what: str = "prompt file"):
    """A one-line `PromptError` unless `path` is a regular file: a directory or a device (`/dev/zero`, a pipe) is
    named for what it is, not reported as missing."""
    if not os.path.exists(path):
        raise PromptError(f"{what} '{path}' does not exist")
    if os.path.isdir(path):
        raise PromptError(f"{what} '{path}' is a directory, not a file")
    if not os.path.isfile(path):
        raise PromptError(f"{what} '{path}' is not a regular file (a device, pipe or socket)")


def _text_lines(path: str, what: str = "prompt file") -> Iterator[Tuple[int, str]]:
    """`(line number, text)` of each line of a UTF-8 file, read one line at a time (a large file is never held whole).

    Lines end at `\n` (a `\r\n` ending loses its `\r`) and nowhere else: a form feed or U+2028 inside a line is part
    of it, so a prompt holding one is not split in two."""
    check_prompt_path(path, what)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PromptError(f"{what} '{path}' cannot be read: {e.strerror or e}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{what} '{path}' is not UTF-8 text (line {number}, byte 0x{raw[e.start]:02x}): "
                                  f"save it as UTF-8") from None
            if "\x00" in line:
                raise PromptError(f"{what} '{path}' is not a text file (it holds NUL bytes)")
            yield number, line[:-1] if line.endswith("\n") else line


def _strip_line_end(line: str) -> str:
    return line[:-1] if line.endswith("\r") else line


def _record(row: dict, column: str, where: str) -> Tuple[str, dict]:
    """`(prompt, metadata)` of one row: its `column` (a non-empty string) and its other fields."""
    if column not in row:
        fields = ", ".join(str(k) for k in row) or "none"
        raise PromptError(f"{where} has no '{column}' field (fields: {fields}); set prompt_column to the prompt's")
    prompt = row[column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{where}: '{column}' must be a non-empty string; got {prompt!r}")
    metadata = {k: v for k, v in row.items() if k != column}
    for key in RESERVED_METADATA:
        if key in metadata:
            raise PromptError(f"{where} has a '{key}' field, which is reserved (the trainer sets each sample's "
                              f"{key}): rename it")
    return prompt.strip(), metadata


def _read_jsonl(path: str, column: str) -> Tuple[List[str], List[dict]]:
    prompts, metadata = [], []
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"prompt file '{path}' line {number} is not valid JSON ({e.msg})") from None
        except RecursionError:  # the parser recurses once per level: its depth limit is the interpreter's
            raise PromptError(f"prompt file '{path}' line {number} is nested too deeply (more than "
                              f"{sys.getrecursionlimit()} levels); one flat object per line") from None
        if not isinstance(row, dict):
            raise PromptError(f"prompt file '{path}' line {number} is not a JSON object (one object per line, "
                              f"with a '{column}' field)")
        prompt, meta = _record(row, column, f"prompt file '{path}' line {number}")
        prompts.append(prompt)
        metadata.append(meta)
    return prompts, metadata


def _read_csv(path: str, column: str) -> Tuple[List[str], List[dict]]:
    # one line at a time, each with its `\n` back: a quoted cell may hold a line break, which the reader joins
    reader = csv.DictReader(line + "\n" for _, line in _text_lines(path))
    if reader.fieldnames is not None and column not in reader.fieldnames:
        raise PromptError(f"prompt file '{path}' has no '{column}' column (columns: {', '.join(reader.fieldnames)}); "
                          f"set prompt_column to the prompt's")
    prompts, metadata = [], []
    try:
        for row in reader:
            where = f"prompt file '{path}' line {reader.line_num}"
            if None in row:
                raise PromptError(f"{where} has more cells than the header has columns")
            if not any((value or "").strip() for value in row.values()):
                continue  # a blank line
            prompt, meta = _record(row, column, where)
            prompts.append(prompt)
            metadata.append(meta)
    except csv.Error as e:
        raise PromptError(f"prompt file '{path}' line {reader.line_num} is not valid CSV ({e})") from None
    return prompts, metadata


def read_prompt_records(path: str, column: str = "prompt") -> Tuple[List[str], List[dict]]:
    """`(prompts, metadata)` of a prompt file: JSON Lines (`.jsonl`, one object per line) or CSV (`.csv`, a header
    row) with the prompt in `column` and the other fields as the prompt's metadata; any other file is text, one
    prompt per line (blank lines and `#` comments skipped), without metadata. Lines end at `\n` or `\r\n` only
    (never at a form feed or U+2028, which stay inside their prompt), and the file is read a line at a time.

    A JSONL/CSV row with an `image` (or, JSONL only, `images`: a list) field names condition images for editing
    and image-to-video models, a `video` (`videos`) field condition videos, a `last_image` field the last frame of a
    first-last-frame video model, relative to the prompt file: its prompt becomes a `ConditionedPrompt` (see
    `attach_condition_images`)."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        prompts, metadata = attach_condition_images(*_read_jsonl(path, column), path)
    elif extension == ".csv":
        prompts, metadata = attach_condition_images(*_read_csv(path, column), path, empty_cell_is_none=True)
    else:
        prompts = []
        for _, line in _text_lines(path):
            prompt = _strip_line_end(line).strip()
            if prompt and not prompt.startswith("#"):
                prompts.append(prompt)
        metadata = [{} for _ in prompts]
    if not prompts:
        raise PromptError(f"prompt file '{path}' has no prompts")
    return prompts, metadata


def read_prompt_file(path: str, column: str = "prompt") -> List[str]:
    """The prompts of a prompt file (see `read_prompt_records`)."""
    return read_prompt_records(path, column)[0]


def read_prompt_dataset(path: str, split: str = "train", column: str = "prompt",
                        whole: bool = True) -> Tuple[List[str], List[dict]]:
    """`(prompts, metadata)` of split `split` of a Hugging Face `datasets` dataset stored locally (the hub is never
    asked): a directory written by `save_to_disk`, or data files (a directory of them, or one `.jsonl`/`.json`/
    `.csv`/`.parquet` file) read with `load_dataset`. The prompt is column `column`; the other columns are the prompt's
    metadata. A dataset without splits is used `whole` (the training prompts), else refused."""
    if not os.path.exists(path):
        raise PromptError(f"prompt_dataset '{path}' does not exist (a local dataset directory written by save_to_disk, "
                          f"or data files; the hub is not used)")
    try:
        import datasets
    except ImportError:
        raise PromptError("prompt_dataset needs the `datasets` package: pip install 'diffalign[datasets]'") from None
    try:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in
                                       ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(path)
        elif os.path.isdir(path):
            loaded = datasets.load_dataset(path)
        else:
            builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
            builder = builders.get(os.path.splitext(path)[1].lower())
            if builder is None:
                raise PromptError(f"prompt_dataset '{path}' is not a dataset directory or a "
                                  f"{'/'.join(sorted(builders))} file")
            loaded = datasets.load_dataset(builder, data_files=path)
    except PromptError:
        raise
    except Exception as e:  # noqa: BLE001 (datasets raises many types: FileNotFoundError, DatasetGenerationError...)
        raise PromptError(f"prompt_dataset '{path}' cannot be loaded: {first_line(e)}") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise PromptError(f"prompt_dataset '{path}' has no split '{split}' (splits: {', '.join(loaded)})")
        dataset = loaded[split]
    elif whole:
        dataset = loaded
    else:
        raise PromptError(f"prompt_dataset '{path}' has no splits, so it has no split '{split}'")
    if column not in (dataset.column_names or []):
        raise PromptError(f"prompt_dataset '{path}' split '{split}' has no '{column}' column (columns: "
                          f"{', '.join(dataset.column_names or [])}); set prompt_column to the prompt's")
    prompts, metadata = [], []
    for number, row in enumerate(dataset):
        prompt, meta = _record(row, column, f"prompt_dataset '{path}' split '{split}' row {number}")
        prompts.append(prompt)
        metadata.append(meta)
    if not prompts:
        raise PromptError(f"prompt_dataset '{path}' split '{split}' is empty")
    return prompts, metadata


def prompt_source(prompts=None, prompt_file=None, prompt_fn=None, prompt_dataset=None, prompt_dataset_split="train",
                  prompt_column="prompt") -> PromptSource:
    """Builds the prompt source of a config (exactly one of the four, or `digits` when none is given)."""
    listed = _listed_source(prompts, prompt_file, prompt_dataset if prompt_dataset else None, prompt_dataset_split,
                            prompt_column)
    if listed is not None:
        return listed
    prompt_fn = prompt_fn or "digits"
    if prompt_fn in BUILTIN_PROMPTS:
        return PromptSource(prompts=BUILTIN_PROMPTS[prompt_fn]())
    if ":" not in prompt_fn:
        raise PromptError(f"unknown prompt_fn '{prompt_fn}'; built-ins: {', '.join(BUILTIN_PROMPTS)}, or module:function")
    module_name, _, attr = prompt_fn.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)  # runs user code, as documented
    except (ImportError, AttributeError) as e:
        raise PromptError(f"prompt_fn '{prompt_fn}' cannot be loaded ({e})") from None
    if not callable(fn):
        raise PromptError(f"prompt_fn '{prompt_fn}' is not a function")
    try:
        result = fn()
    except Exception as e:
        raise PromptError(f"prompt_fn '{prompt_fn}' failed: {first_line(e)}") from e
    if isinstance(result, (list, tuple)) and not _is_prompt_with_metadata(result):
        return PromptSource(prompts=[str(p) for p in result])
    return PromptSource(fn=fn)


def heldout_prompt_source(eval_prompts=None, eval_prompt_file=None, eval_dataset_split=None, prompt_dataset=None,
                          prompt_column="prompt") -> Optional[PromptSource]:
    """The held-out prompts of a config (`eval_prompts`, `eval_prompt_file`, or split `eval_dataset_split` of
    `prompt_dataset`), or `None` when it has none."""
    return _listed_source(eval_prompts, eval_prompt_file, prompt_dataset if eval_dataset_split else None,
                          eval_dataset_split, prompt_column, whole=False)


def _listed_source(prompts, prompt_file, dataset, split, column, whole=True) -> Optional[PromptSource]:
    """A prompt list given inline, as a file (text, JSONL, CSV) or as a dataset split, in that order; else None."""
    if prompts:
        return PromptSource(prompts=prompts)
    if prompt_file:
        return PromptSource(*_as_list_and_metadata(read_prompt_records(prompt_file, column)))
    if dataset:
        kwargs = {} if whole else {"whole": False}
        return PromptSource(*_as_list_and_metadata(read_prompt_dataset(dataset, split, column, **kwargs)))
    return None


def _as_list_and_metadata(records: Tuple[List[str], List[dict]]):
    prompts, metadata = records
    return prompts, None, metadata


def _is_prompt_with_metadata(result) -> bool:
    return isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)
