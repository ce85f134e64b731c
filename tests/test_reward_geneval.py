"""The `geneval` reward's rules, checked exactly on hand-made detections: a detector stub returns known boxes and
confidences per class, a colour stub known colours, so every rule (threshold, counting, colour, position,
co-occurrence, exclusion) and both scores (GenEval's strict verdict, Flow-GRPO's partial reward) are known."""

import json

import pytest
import torch

from diffalign.rewards import RewardError, available_rewards, call_reward, get_reward
from diffalign.rewards.geneval import box_iou, keep_detections, relative_position

# rows of Flow-GRPO's dataset/geneval/*_metadata.jsonl
COUNTING = json.loads('{"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": '
                      '"wine glass", "count": 3}], "prompt": "a photo of two wine glasses"}')
POSITION = json.loads('{"tag": "position", "include": [{"class": "pizza", "count": 1}, {"class": "toothbrush", '
                      '"count": 1, "position": ["below", 0]}], "prompt": "a photo of a toothbrush below a pizza"}')
TWO_OBJECT = json.loads('{"tag": "two_object", "include": [{"class": "vase", "count": 1}, {"class": "spoon", '
                        '"count": 1}], "prompt": "a photo of a vase and a spoon"}')
COLOR_ATTR = json.loads('{"tag": "color_attr", "include": [{"class": "suitcase", "count": 1, "color": "purple"}, '
                        '{"class": "pizza", "count": 1, "color": "orange"}], "prompt": "a photo of a purple suitcase '
                        'and an orange pizza"}')
SINGLE = {"tag": "single_object", "include": [{"class": "boat", "count": 1}], "prompt": "a photo of a boat"}
COLORS_TWO = {"tag": "colors", "include": [{"class": "cat", "count": 2, "color": "black"}], "prompt": "two black cats"}


class StubDetector:
    """Answers the detections given for each image (by its index, read from the image's first pixel)."""

    def __init__(self, per_image):
        self.per_image = per_image
        self.asked = []

    def __call__(self, image, classes):
        self.asked.append(classes)
        return self.per_image[int(image[0, 0, 0])]


def colour_by_x(image, boxes, name):
    """Colours by where the box starts: x1 < 100 black, < 200 orange, else purple."""
    return ["black" if b[0] < 100 else "orange" if b[0] < 200 else "purple" for b in boxes]


def images(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8) / 255


def score(mode, metadata, detections, colour_classifier=colour_by_x):
    detector = StubDetector(detections)
    reward = get_reward("geneval", detector=detector, colour_classifier=colour_classifier, mode=mode)
    scores = call_reward(reward, images(len(detections)), [m["prompt"] for m in metadata], metadata, name="geneval")
    return scores.tolist(), reward


BOX = (10, 10, 50, 50)


def test_presence_and_co_occurrence():
    dets = [{"boat": [(BOX, 0.5)]}, {"boat": [(BOX, 0.29)]}, {"vase": [(BOX, 0.8)], "spoon": [((60, 10, 90, 40), 0.4)]},
            {"vase": [(BOX, 0.8)]}]
    metadata = [SINGLE, SINGLE, TWO_OBJECT, TWO_OBJECT]
    strict, reward = score("strict", metadata, dets)
    assert "geneval" in available_rewards()
    assert strict == [1.0, 0.0, 1.0, 0.0]  # confidence must be above 0.3
    assert reward.last_reasons[1] == ["expected boat>=1, found 0"] and reward.last_reasons[3] == [
        "expected spoon>=1, found 0"]
    partial, _ = score("flow_grpo", metadata, dets)
    assert partial == [1.0, 0.0, 1.0, 0.5]  # mean of the two clauses: vase 1, spoon 1 - |1 - 0| / 1 = 0


def test_counting_uses_the_counting_threshold_and_the_exclusion():
    glass = [((i * 60, 0, i * 60 + 50, 50), c) for i, c in enumerate((0.95, 0.92, 0.85))]
    dets = [{"wine glass": glass},  # two above 0.9: correct
            {"wine glass": glass + [((300, 0, 350, 50), 0.99)]},  # three above 0.9: the exclusion fails
            {"wine glass": glass[:1] + [((0, 100, 50, 150), 0.5)]}]  # one above 0.9
    strict, reward = score("strict", [COUNTING] * 3, dets)
    assert strict == [1.0, 0.0, 0.0]
    assert reward.last_reasons[1] == ["expected wine glass<3, found 3"]
    partial, _ = score("flow_grpo", [COUNTING] * 3, dets)
    assert partial == [1.0, 0.5, 0.5]  # 1 - |2 - 3| / 2 and 1 - |2 - 1| / 2; Flow-GRPO scores no exclusion


def test_colour():
    dets = [{"suitcase": [((250, 0, 300, 50), 0.9)], "pizza": [((150, 0, 190, 50), 0.9)]},  # purple, orange: right
            {"suitcase": [((250, 0, 300, 50), 0.9)], "pizza": [((10, 0, 50, 50), 0.9)]},  # the pizza is black
            {"cat": [((10, 0, 50, 50), 0.9), ((300, 0, 350, 50), 0.8), ((20, 0, 60, 50), 0.7)]}]  # black, purple
    strict, reward = score("strict", [COLOR_ATTR, COLOR_ATTR, COLORS_TWO], dets)
    assert strict == [1.0, 0.0, 0.0]
    assert reward.last_reasons[1] == ["expected orange pizza>=1, found 0 orange"]
    partial, _ = score("flow_grpo", [COLOR_ATTR, COLOR_ATTR, COLORS_TWO], dets)
    # suitcase [1, 1], pizza [1, 0] -> 3/4; three cats for two: [1 - 1/2, 0] -> 1/4
    assert partial == [1.0, 0.75, 0.25]


def test_position():
    pizza = [((100, 0, 200, 60), 0.9)]
    dets = [{"pizza": pizza, "toothbrush": [((120, 150, 180, 170), 0.9)]},  # well below
            {"pizza": pizza, "toothbrush": [((300, 0, 350, 60), 0.9)]},  # beside it: right of
            {"pizza": pizza, "toothbrush": [((130, 20, 170, 50), 0.9)]},  # inside it: no relation
            {"toothbrush": [((120, 150, 180, 170), 0.9)]}]  # no pizza to be below
    metadata = [POSITION] * 4
    strict, reward = score("strict", metadata, dets)
    assert strict == [1.0, 0.0, 0.0, 0.0]
    assert reward.last_reasons[1] == ["expected toothbrush below target"]
    assert reward.last_reasons[3] == ["expected pizza>=1, found 0", "no target for toothbrush to be below"]
    partial, _ = score("flow_grpo", metadata, dets)
    # pass: [1, 1, 1]; failed check: [1, 1, 0, 1] (reward-server adds a 1 after the check either way); no pizza:
    # pizza [0], toothbrush [1, 0]
    assert partial == [1.0, 0.75, 0.75, pytest.approx(1 / 3)]


def test_relative_position_and_iou():
    assert relative_position((0, 0, 10, 10), (100, 0, 110, 10)) == {"left of"}
    assert relative_position((100, 100, 110, 110), (0, 0, 10, 10)) == {"right of", "below"}  # a diagonal: both
    assert relative_position((0, 200, 10, 210), (0, 0, 10, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    # offset -20 on x, boxes 100 wide: shrunk by 0.1 * 200 = 20 -> no relation; by 0.05 * 200: -10 / 20 = -0.5, not
    # below -0.5 -> none; by 0.04 * 200: -12 / 20 -> left of
    assert relative_position((0, 0, 100, 10), (20, 0, 120, 10)) == set()
    assert relative_position((0, 0, 100, 10), (20, 0, 120, 10), 0.05) == set()
    assert relative_position((0, 0, 100, 10), (20, 0, 120, 10), 0.04) == {"left of"}
    # overlapping, 25 apart on y: 25 - 0.1 * (60 + 50) = 14, 14 / 25 = 0.56 -> below
    assert relative_position((130, 30, 170, 80), (100, 0, 200, 60)) == {"below"}
    # mostly right, a little up: dx = 0.99, dy = -0.1 -> right of only
    assert relative_position((100, 0, 110, 10), (0, 10, 10, 20)) == {"right of"}
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0 and box_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # inclusive pixels: 10 x 10 boxes


def test_keep_detections():
    found = {"cat": [((0, 0, 9, 9), 0.5), ((5, 0, 14, 9), 0.9), ((50, 0, 59, 9), 0.2), ((80, 0, 89, 9), 0.7)],
             "dog": [((0, 0, 9, 9), 0.1)]}
    assert keep_detections(found, 0.3) == {"cat": [(5, 0, 14, 9), (80, 0, 89, 9), (0, 0, 9, 9)]}
    assert keep_detections(found, 0.3, max_objects=2) == {"cat": [(5, 0, 14, 9), (80, 0, 89, 9)]}
    assert keep_detections(found, 0.3, max_overlap=0.3) == {"cat": [(5, 0, 14, 9), (80, 0, 89, 9)]}  # IoU 1/3


def test_the_detector_is_asked_for_the_prompts_classes():
    detector = StubDetector([{"wine glass": []}])
    get_reward("geneval", detector=detector, colour_classifier=None)(images(1), [COUNTING["prompt"]], [COUNTING])
    assert detector.asked == [["wine glass"]]


@pytest.mark.parametrize("metadata, expected", [
    (None, "needs GenEval's metadata for each of the 1 images"),
    ([{"tag": "single_object"}], "has no 'include' list"),
    ([{"include": [{"class": "cat", "count": 0}]}], "include[0] must be {class: name, count: integer >= 1}"),
    ([{"include": [{"class": "cat", "count": 1, "color": "teal"}]}], "'teal' is not one of GenEval's colours"),
    ([{"include": [{"class": "cat", "count": 1, "position": ["below", 0]}]}], "include[0].position must be"),
    ([{"include": [{"class": "cat", "count": 1, "color": "red"}]}], "no colour_classifier was given"),
])
def test_bad_metadata_is_one_line(metadata, expected):
    reward = get_reward("geneval", detector=StubDetector([{"cat": [(BOX, 0.9)]}]), colour_classifier=None)
    with pytest.raises(RewardError) as error:
        call_reward(reward, images(1), ["a cat"], metadata, name="geneval")
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)


def test_bad_settings_and_a_bad_colour_classifier_are_one_line():
    with pytest.raises(RewardError, match="mode must be one of flow_grpo, strict"):
        get_reward("geneval", detector=StubDetector([]), colour_classifier=None, mode="loose")
    with pytest.raises(RewardError, match="detector 'no_module_here:make' cannot be imported"):
        get_reward("geneval", detector="no_module_here:make")
    reward = get_reward("geneval", detector=StubDetector([{"cat": [(BOX, 0.9)]}]),
                        colour_classifier=lambda image, boxes, name: ["teal"])
    with pytest.raises(RewardError, match="returned \\['teal'\\] for 1 boxes"):
        reward(images(1), ["a red cat"], [{"include": [{"class": "cat", "count": 1, "color": "red"}]}])


# ------------------------------------------------------------------ the transformers detector and colour classifier
def test_owl_detections_follow_transformers_post_processing():
    """Each box goes to its best query, confidence sigmoid(logit), centre/size on the padded square -> pixels, clipped
    to the image (here 40 high, 60 wide: the square is 60)."""
    logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.0, -5.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.4, 0.4], [0.25, 0.25, 0.5, 0.5]])
    from diffalign.rewards.geneval import owl_detections

    found = owl_detections(logits, boxes, ["cat", "dog"], height=40, width=60)
    assert set(found) == {"cat", "dog"}
    (box_a, conf_a), (box_c, conf_c) = found["cat"]
    (box_b, conf_b), = found["dog"]
    assert conf_a == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item()) and conf_c == pytest.approx(0.5)
    assert box_a == pytest.approx((24, 24, 36, 36)) and box_c == pytest.approx((0, 0, 30, 30))
    assert box_b == pytest.approx((0, 40, 18, 40))  # (-6, 42, 18, 66) clipped to the 60 x 40 image


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny random OWLv2 and CLIP checkpoints on disk (real CLIP tokenizer), for the code path."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Owlv2Config,
                              Owlv2ForObjectDetection, Owlv2Processor)

    from diffalign.testing import tiny_clip_text_kwargs
    from diffalign.tokenization import offline_clip_tokenizer

    text = tiny_clip_text_kwargs()
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=16)
    torch.manual_seed(0)
    owl_dir, clip_dir = tmp_path_factory.mktemp("tiny_owlv2"), tmp_path_factory.mktemp("tiny_clip")
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=dict(vision, image_size=64),
                                        projection_dim=text["hidden_size"])).save_pretrained(owl_dir)
    try:
        from transformers import Owlv2ImageProcessorPil as OwlImageProcessor  # no torchvision here
    except ImportError:
        from transformers import Owlv2ImageProcessor as OwlImageProcessor
    Owlv2Processor(image_processor=OwlImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=offline_clip_tokenizer(16)).save_pretrained(owl_dir)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision, image_size=32, patch_size=16),
                         projection_dim=16)).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=offline_clip_tokenizer()).save_pretrained(clip_dir)
    return str(owl_dir), str(clip_dir)


def test_the_transformers_detector_and_colour_classifier_run(tiny_models):
    owl_dir, clip_dir = tiny_models
    reward = get_reward("geneval", detector_model=owl_dir, clip_model=clip_dir, threshold=0.0, mode="strict")
    x = torch.rand(2, 3, 40, 60)
    scores = call_reward(reward, x, [COLOR_ATTR["prompt"], COUNTING["prompt"]], [COLOR_ATTR, COUNTING],
                         name="geneval")
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0}
    image = (x[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    found = reward.detector(image, ["suitcase", "pizza"])
    assert set(found) == {"suitcase", "pizza"} and sum(len(v) for v in found.values()) == (64 // 16) ** 2
    boxes = [(b, c) for v in found.values() for b, c in v]
    assert all(0 <= b[0] <= b[2] <= 60 and 0 <= b[1] <= b[3] <= 40 and 0 <= c <= 1 for b, c in boxes), boxes
    colours = reward.colour_classifier(image, [(0, 0, 30, 20), (30, 20, 60, 40), (0, 40, 18, 40)], "pizza")
    assert len(colours) == 3 and all(c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                                           "black", "white") for c in colours)


def test_missing_detector_weights_are_one_line(tmp_path):
    from diffalign.rewards import RewardWeightsNotFoundError

    with pytest.raises(RewardWeightsNotFoundError) as error:
        get_reward("geneval", detector_model=str(tmp_path / "nowhere"), colour_classifier=None)
    message = str(error.value)
    assert "\n" not in message and "detector_model" in message and "google/owlv2-base-patch16-ensemble" in message
