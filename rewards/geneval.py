"""GenEval: does the image hold the objects its prompt asks for, in the right number, colours and places?

GenEval (Ghosh et al., 2023; `djghosh13/geneval`, `evaluation/evaluate_images.py`) checks an image against its
prompt's metadata, one JSON object per prompt (Flow-GRPO's `dataset/geneval/*_metadata.jsonl`, which diffalign's
prompt files read as each prompt's metadata):

    {"tag": "position", "prompt": "a photo of a toothbrush below a pizza",
     "include": [{"class": "pizza", "count": 1}, {"class": "toothbrush", "count": 1, "position": ["below", 0]}]}
    {"tag": "counting", "prompt": "a photo of two wine glasses",
     "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}]}

Its rules, as implemented here (the pure functions below):

- **detections kept**: per class, those with confidence above 0.3 (0.9 for `counting` prompts), most confident first,
  at most 16 (and, if `max_overlap` < 1, greedy non-maximum suppression; GenEval's default 1 keeps all);
- **presence and counting**: an `include` clause needs at least `count` detections of its class (the `count` most
  confident are the ones checked further); an `exclude` clause fails when there are `count` or more;
- **colour**: each of those objects is classified into one of ten colours; at least `count` must be `color`;
- **position**: `["below", i]` compares each object with each object of the `i`-th include clause (which must have
  passed): the centre offset, shrunk on each axis by 0.1 x the sum of the two boxes' sizes, normalised by the
  offset's length; `left of` / `right of` when its x part is below -0.5 / above 0.5, `above` / `below` for y;
- **strict** (`mode: strict`): the image is correct (1) when every clause passes, else 0: GenEval's score.
- **partial** (`mode: flow_grpo`, the default): Flow-GRPO's training reward (`yifan123/reward-server`,
  `reward_server/gen_eval.py`, `evaluate_reward`): the mean of per-clause parts, each `1 - |count - found| / count` for
  the number of objects (exact counts: too many is penalised) and for the number of the right colour, and 0 or 1
  for the position check (as there, a failed position check adds a 0 and then a 1); `exclude` is not scored.

The detector and the colour classifier sit behind two small interfaces (`Detector`, `ColourClassifier`), so the
rules are checked exactly against hand-made detections in `tests/test_reward_geneval.py`.

How this relates to the official scorer: GenEval's detector is Mask2Former (Swin-S, COCO classes) through
mmdetection, with CLIP ViT-L/14 (OpenAI weights) colour classification of each object's crop, greyed outside its
mask. mmdetection does not install beside this stack, so the defaults are transformers models: OWLv2
(`google/owlv2-base-patch16-ensemble`, open vocabulary, asked for "a photo of a <class>") and CLIP ViT-L/14 with
GenEval's three colour templates on the box crop (no mask). Given the same detections and colours, the scores equal
GenEval's exactly (the rules are the same); with OWLv2 they are not the official numbers: its confidences are on
another scale than Mask2Former's, for which GenEval's thresholds (0.3, 0.9 for counting) were set, and a box crop
holds some background. Set `threshold` and `counting_threshold` for your detector, and report official GenEval
numbers with the official scorer (or a `detector` wrapping Mask2Former: any callable
`uint8 [H, W, 3], class names -> {class: [(box, confidence), ...]}`).
"""

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from . import RewardError, register_reward
from .jpeg import to_uint8_hwc

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MODES = ("flow_grpo", "strict")

Box = Sequence[float]  # (x1, y1, x2, y2) in pixels
Detector = Callable[[np.ndarray, List[str]], Dict[str, List[Tuple[Box, float]]]]
ColourClassifier = Callable[[np.ndarray, List[Box], str], List[str]]


# ------------------------------------------------------------------------------------------------ rules (pure)
def box_iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes, counting pixels inclusively (`x2 - x1 + 1`) as
    GenEval does."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0.0


def keep_detections(detections: Dict[str, List[Tuple[Box, float]]], threshold: float, max_objects: int = 16,
                    max_overlap: float = 1.0) -> Dict[str, List[Box]]:
    """Per class, the boxes with confidence above `threshold`, most confident first, at most `max_objects`, then
    greedy non-maximum suppression at IoU `max_overlap` (1: none). Classes left without a box are dropped."""
    kept = {}
    for name, found in detections.items():
        ranked = sorted((d for d in found if d[1] > threshold), key=lambda d: -d[1])[:max_objects]
        boxes: List[Box] = []
        while ranked:
            best = ranked.pop(0)[0]
            boxes.append(tuple(float(v) for v in best[:4]))
            if max_overlap < 1:
                ranked = [d for d in ranked if box_iou(best, d[0]) < max_overlap]
        if boxes:
            kept[name] = boxes
    return kept


def relative_position(box_a: Box, box_b: Box, position_threshold: float = 0.1) -> Set[str]:
    """Where box A lies relative to box B: a subset of {"left of", "right of", "above", "below"} (image y grows
    downwards). The centre offset is shrunk on each axis by `position_threshold` times the summed box sizes, then
    divided by the offset's length; a component below -0.5 or above 0.5 names a relation. Overlapping boxes: none."""
    a, b = np.asarray(box_a[:4], dtype=np.float64), np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - position_threshold * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColoursOf = Callable[[str, List[Box]], List[str]]


def _position_holds(objects: List[Box], targets: List[Box], relation: str, position_threshold: float) -> bool:
    return all(relation in relative_position(obj, target, position_threshold)
               for obj in objects for target in targets)


def strict_correct(objects: Dict[str, List[Box]], metadata: dict, colours_of: ColoursOf,
                   position_threshold: float = 0.1) -> Tuple[bool, List[str]]:
    """GenEval's verdict on one image: `(every clause passes, the reasons of those that fail)`.

    `objects` are the kept detections (`keep_detections`), most confident first; `colours_of(class, boxes)` names
    the colour of each box (called only for clauses with a `color`)."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colours = colours_of(name, found)
                if colours.count(clause["color"]) < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found "
                                   f"{colours.count(clause['color'])} {clause['color']}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                elif not _position_holds(found, groups[target], relation, position_threshold):
                    matched = False
                    reasons.append(f"expected {name} {relation} target")
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {len(objects[clause['class']])}")
    return correct, reasons


def flow_grpo_score(objects: Dict[str, List[Box]], metadata: dict, colours_of: ColoursOf,
                    position_threshold: float = 0.1) -> float:
    """Flow-GRPO's partial GenEval reward of one image (see the module docstring): 1 when every clause passes, less
    for each miss, below 0 when far more objects are found than asked (`1 - |1 - 3| / 1` = -1 for one asked, three
    found)."""
    parts, groups = [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])  # all of them: too many is penalised too
        parts.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                parts.append(0.0)
        else:
            if "color" in clause:
                right = colours_of(name, found).count(clause["color"])
                parts.append(1 - abs(count - right) / count)
                matched = right == count
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    parts.append(0.0)
                else:
                    if not _position_holds(found, groups[target], relation, position_threshold):
                        matched = False
                        parts.append(0.0)
                    parts.append(1.0)  # as reward-server: added after the check, whether it passed or not
        groups.append(found if matched else None)
    return sum(parts) / len(parts) if parts else 0.0


def check_metadata(metadata, index: int = 0) -> dict:
    """`metadata` if it is a GenEval record, else a one-line `RewardError` naming what is wrong."""
    where = f"reward 'geneval': metadata of image {index}"
    if not isinstance(metadata, dict) or not isinstance(metadata.get("include"), list) or not metadata["include"]:
        raise RewardError(f"{where} has no 'include' list of objects; geneval needs GenEval's metadata for each "
                          f"prompt (a JSONL prompt file with tag/include/exclude, e.g. Flow-GRPO's "
                          f"dataset/geneval/train_metadata.jsonl)")
    for kind in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(kind) or []):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or isinstance(
                    clause.get("count"), bool) or not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise RewardError(f"{where}: {kind}[{i}] must be {{class: name, count: integer >= 1}}; got "
                                  f"{str(clause)[:80]}")
            if kind == "include" and "color" in clause and clause["color"] not in COLORS:
                raise RewardError(f"{where}: include[{i}].color {clause['color']!r} is not one of GenEval's colours "
                                  f"({', '.join(COLORS)})")
            if kind == "include" and "position" in clause:
                position = clause["position"]
                if not (isinstance(position, (list, tuple)) and len(position) == 2 and position[0] in RELATIONS
                        and isinstance(position[1], int) and 0 <= position[1] < i):
                    raise RewardError(f"{where}: include[{i}].position must be [relation, index of an earlier "
                                      f"include] with a relation among {', '.join(RELATIONS)}; got {position!r}")
    return metadata


# ------------------------------------------------------------------------- a detector and a colour classifier
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # GenEval's colour classifier: open_clip ViT-L-14 "openai", the same weights
COLOUR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")


def owl_detections(logits: torch.Tensor, boxes: torch.Tensor, classes: List[str], height: int, width: int
                   ) -> Dict[str, List[Tuple[Box, float]]]:
    """OWL-ViT/OWLv2 outputs of one image (`logits [patches, queries]`, `boxes [patches, 4]` as normalised centre,
    width, height on the square padded image) as `{class: [(x1, y1, x2, y2), confidence]}` in the image's pixels:
    each box goes to its best query with confidence `sigmoid(logit)`, as transformers' post-processing does, and is
    clipped to the image (OWLv2 pads the image at the bottom and right to a square)."""
    side = max(height, width)
    best = logits.float().max(dim=-1)
    scores, labels = torch.sigmoid(best.values), best.indices
    cx, cy, w, h = (boxes.float() * side).unbind(-1)
    xyxy = torch.stack([(cx - w / 2).clamp(0, width), (cy - h / 2).clamp(0, height),
                        (cx + w / 2).clamp(0, width), (cy + h / 2).clamp(0, height)], dim=-1)
    found: Dict[str, List[Tuple[Box, float]]] = {name: [] for name in classes}
    for box, score, label in zip(xyxy.tolist(), scores.tolist(), labels.tolist()):
        found[classes[label]].append((tuple(box), score))
    return found


class OwlDetector:
    """An open-vocabulary detector (OWLv2 through transformers) asked for `"a photo of a <class>"`."""

    def __init__(self, model: str = DEFAULT_DETECTOR, device: str = "cpu", template: str = "a photo of a {}"):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        from .clip_rewards import from_pretrained_or_raise

        self.processor = from_pretrained_or_raise(Owlv2Processor, model, reward="geneval", argument="detector_model",
                                                  default=DEFAULT_DETECTOR)
        self.model = from_pretrained_or_raise(Owlv2ForObjectDetection, model, reward="geneval",
                                              argument="detector_model", default=DEFAULT_DETECTOR,
                                              use_safetensors=True).eval().requires_grad_(False).to(device)
        self.device, self.template = device, template

    @torch.no_grad()
    def __call__(self, image: np.ndarray, classes: List[str]) -> Dict[str, List[Tuple[Box, float]]]:
        from PIL import Image

        inputs = self.processor(text=[[self.template.format(c) for c in classes]], images=Image.fromarray(image),
                                return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        return owl_detections(outputs.logits[0], outputs.pred_boxes[0], classes, *image.shape[:2])


class ClipColourClassifier:
    """GenEval's colour classification: CLIP zero-shot over `COLORS` on each box's crop, each colour's text embedding
    the normalised mean of GenEval's three templates' normalised embeddings (clip_benchmark's zero-shot classifier).
    Without masks (a box detector), the crop is the box itself, where GenEval greys out what is outside the mask."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        from .clip_rewards import from_pretrained_or_raise

        self.processor = from_pretrained_or_raise(CLIPProcessor, model, reward="geneval", argument="clip_model",
                                                  default=DEFAULT_CLIP)
        self.model = from_pretrained_or_raise(CLIPModel, model, reward="geneval", argument="clip_model",
                                              default=DEFAULT_CLIP, use_safetensors=True
                                              ).eval().requires_grad_(False).to(device)
        self.device = device
        self._classifiers: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, name: str) -> torch.Tensor:
        """`[colours, dim]`: each colour's unit text embedding for objects of class `name`."""
        if name not in self._classifiers:
            texts = [t.format(c=c, name=name) for c in COLORS for t in COLOUR_TEMPLATES]
            tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            # tower + projection, like `get_text_features` (whose return type changed in transformers 5)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            embeds = torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1)
            embeds = embeds.view(len(COLORS), len(COLOUR_TEMPLATES), -1).mean(dim=1)
            self._classifiers[name] = torch.nn.functional.normalize(embeds, dim=-1)
        return self._classifiers[name]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes: List[Box], name: str) -> List[str]:
        from PIL import Image

        picture = Image.fromarray(image)
        crops = [picture.crop(_pixel_box(box, picture.width, picture.height)) for box in boxes]
        pixels = self.processor.image_processor(crops, return_tensors="pt")["pixel_values"].to(self.device)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
        features = torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)
        return [COLORS[i] for i in (features @ self.classifier(name).T).argmax(dim=-1).tolist()]


def _pixel_box(box: Box, width: int, height: int) -> Tuple[int, int, int, int]:
    """`box` rounded to whole pixels inside the image, at least one pixel wide and high (a box clipped at the border
    can be empty)."""
    x1 = min(max(int(round(box[0])), 0), width - 1)
    y1 = min(max(int(round(box[1])), 0), height - 1)
    return x1, y1, max(min(int(round(box[2])), width), x1 + 1), max(min(int(round(box[3])), height), y1 + 1)


# ---------------------------------------------------------------------------------------------------- the reward
class GenEvalReward:
    """GenEval's rules on a detector and a colour classifier (see the module docstring).

    Args:
        detector (`Detector`): `uint8 [H, W, 3], class names -> {class: [((x1, y1, x2, y2), confidence), ...]}`.
        colour_classifier (`ColourClassifier`): `uint8 [H, W, 3], boxes, class -> [colour of each box]`, colours
            among `COLORS`.
        mode (`str`, defaults to `"flow_grpo"`): `"flow_grpo"` (Flow-GRPO's partial score) or `"strict"` (GenEval's
            0/1 correctness).
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: GenEval's options, with its
            defaults 0.3, 0.9, 16, 1.0, 0.1.
    """

    def __init__(self, detector: Detector, colour_classifier: Optional[ColourClassifier] = None,
                 mode: str = "flow_grpo", threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_objects: int = 16, max_overlap: float = 1.0, position_threshold: float = 0.1):
        if mode not in MODES:
            raise RewardError(f"reward 'geneval': mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not callable(detector):
            raise RewardError(f"reward 'geneval': detector must be a callable (image, class names) -> detections; "
                              f"got {type(detector).__name__}")
        for name, value in (("threshold", threshold), ("counting_threshold", counting_threshold),
                            ("max_overlap", max_overlap), ("position_threshold", position_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise RewardError(f"reward 'geneval': {name} must be a number in [0, 1]; got {value!r}")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise RewardError(f"reward 'geneval': max_objects must be an integer >= 1; got {max_objects!r}")
        self.detector = detector
        self.colour_classifier = colour_classifier
        self.mode = mode
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.max_overlap = max_objects, float(max_overlap)
        self.position_threshold = float(position_threshold)
        self.last_reasons: List[List[str]] = []

    def score_image(self, image: np.ndarray, metadata: dict) -> Tuple[float, List[str]]:
        """`(score, reasons)` of one `uint8 [H, W, 3]` image; reasons are GenEval's for the clauses that fail."""
        classes = sorted({c["class"] for c in metadata.get("include", []) + (metadata.get("exclude") or [])})
        threshold = self.counting_threshold if metadata.get("tag") == "counting" else self.threshold
        objects = keep_detections(self.detector(image, classes), threshold, self.max_objects, self.max_overlap)

        def colours_of(name, boxes):
            if self.colour_classifier is None:
                raise RewardError("reward 'geneval': this prompt asks for a colour, and no colour_classifier was "
                                  "given")
            colours = list(self.colour_classifier(image, list(boxes), name))
            if len(colours) != len(boxes) or any(c not in COLORS for c in colours):
                raise RewardError(f"reward 'geneval': the colour classifier returned {colours!r:.80} for "
                                  f"{len(boxes)} boxes; it must name one of {', '.join(COLORS)} per box")
            return colours

        correct, reasons = strict_correct(objects, metadata, colours_of, self.position_threshold)
        if self.mode == "strict":
            return float(correct), reasons
        return flow_grpo_score(objects, metadata, colours_of, self.position_threshold), reasons

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> torch.Tensor:
        if metadata is None or len(metadata) != len(images):
            raise RewardError(f"reward 'geneval' needs GenEval's metadata for each of the {len(images)} images "
                              f"(got {'none' if metadata is None else len(metadata)}): train on a GenEval JSONL "
                              f"prompt file (tag/include/exclude per prompt)")
        records = [check_metadata(m, i) for i, m in enumerate(metadata)]
        scores, self.last_reasons = [], []
        for array, record in zip(to_uint8_hwc(images), records):
            score, reasons = self.score_image(array, record)
            scores.append(score)
            self.last_reasons.append(reasons)
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"GenEvalReward({type(self.detector).__name__}, mode={self.mode!r})"


@register_reward("geneval")
def geneval(detector="owlv2", colour_classifier="clip", mode: str = "flow_grpo", threshold: float = 0.3,
            counting_threshold: float = 0.9, max_objects: int = 16, max_overlap: float = 1.0,
            position_threshold: float = 0.1, detector_model: str = DEFAULT_DETECTOR, clip_model: str = DEFAULT_CLIP,
            device: str = "cpu") -> GenEvalReward:
    """GenEval's rules (see the module docstring) on `detector` and `colour_classifier`: `"owlv2"` and `"clip"`
    (transformers models from `detector_model` and `clip_model`), callables, or `"module:function"` factories that
    return them (called without arguments); `colour_classifier=None` for prompts without colours."""
    detector = OwlDetector(detector_model, device) if detector == "owlv2" else _resolve("detector", detector)
    if colour_classifier == "clip":
        colour_classifier = ClipColourClassifier(clip_model, device)
    elif colour_classifier is not None:
        colour_classifier = _resolve("colour_classifier", colour_classifier)
    return GenEvalReward(detector, colour_classifier, mode=mode, threshold=threshold,
                         counting_threshold=counting_threshold, max_objects=max_objects, max_overlap=max_overlap,
                         position_threshold=position_threshold)


def _resolve(what: str, value):
    """A callable as is; `"module:function"` imported and called (a factory, so a model loads once)."""
    if callable(value):
        return value
    if isinstance(value, str) and ":" in value:
        import importlib

        module_name, _, attr = value.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise RewardError(f"reward 'geneval': {what} {value!r} cannot be imported ({e})") from None
        return factory()
    raise RewardError(f"reward 'geneval': {what} must be a callable or 'module:function' naming a factory; got "
                      f"{value!r:.80}")
