"""The embedded default dataset: rendered scenes whose questions only vision can answer.

A tiny randomly initialised VLM should visibly learn this in minutes on a CPU, so every question has a short answer
from a small closed set, the answer distribution within each question type is close to uniform (a blind model that
always gives a type's most common answer scores low, see `nanovlm.evaluation.scoring.blind_guess_accuracy`), and no question's wording gives
its answer away ("Which is bigger, the red shape or the blue shape?" names both candidates, in random order).

Rows follow the FineVision schema, so the same loaders, rating filters and packers serve this and the real data:

    images                          list of 1-3 PIL images (`datasets.Image()` feature)
    texts                           list of {"user": str, "assistant": str} turns
    source                          "nanovlm_synthetic"
    relevance_ratings, image_correspondence_ratings, visual_dependency_ratings, formatting_ratings
                                    one int in 1..5 per turn
    question_type                   one of QUESTION_TYPES per turn
    sample_id                       "{split}-{seed}-{index}"
    scenes                          JSON list, one scene description per image (shapes, text, background)

Question types: `color`, `count`, `position`, `size`, `reading`, `multi_image`; single-image samples of the first
four types sometimes carry 2-3 turns about the same image. A configurable fraction of turns is "low rated": at
least one of its four ratings is 1 or 2 (clean turns rate 4 or 5 everywhere), and by default its answer is a wrong
one, so a rating filter of 3 drops exactly the noisy turns. Validation and test splits have no low-rated turns by
default, so evaluation references are all correct.

Everything is deterministic: sample `i` of a split is drawn from `random.Random("nanovlm-synthetic:{seed}:{split}:{i}")`
only, so the same seed gives byte-identical PNGs and texts, independent of how many samples are generated, and the
splits come from disjoint seed streams.

    python -m nanovlm.data.synthetic --output_dir data/synthetic --num_train 4000

Modules: `scenes` (what is drawn and how it is rendered), `questions` (`SyntheticConfig`, the question generators
and `generate_sample`), `settings` (`SyntheticSettings`: what a dataset is built from, and its record), `dataset`
(splits, save/load), `cli` (the command above). Scoring answers and the blind guess live in
`nanovlm.evaluation.scoring`.
"""

from .dataset import (
    SETTINGS_FILE,
    SPLITS,
    build_synthetic_dataset,
    build_then_rename,
    generate_split,
    recorded_settings,
    synthetic_features,
)
from .questions import (
    ANSWER_SETS,
    DEFAULT_TYPE_WEIGHTS,
    QUESTION_TYPES,
    RATING_COLUMNS,
    SOURCE,
    SyntheticConfig,
    generate_sample,
    iter_samples,
    sample_rng,
)
from .scenes import (
    COLORS,
    MAX_IMAGES,
    MAX_SHAPES,
    SHAPES,
    TEXT_COLORS,
    WORDS,
    Scene,
    Shape,
    Text,
    describe,
    render_scene,
    side_of,
)
from .settings import SIMPLE_SPLIT, SIMPLE_TYPE_WEIGHTS, SyntheticSettings, simple_config

__all__ = [
    "ANSWER_SETS",
    "COLORS",
    "DEFAULT_TYPE_WEIGHTS",
    "MAX_IMAGES",
    "MAX_SHAPES",
    "QUESTION_TYPES",
    "RATING_COLUMNS",
    "SETTINGS_FILE",
    "SHAPES",
    "SIMPLE_SPLIT",
    "SIMPLE_TYPE_WEIGHTS",
    "SOURCE",
    "SPLITS",
    "TEXT_COLORS",
    "WORDS",
    "Scene",
    "Shape",
    "SyntheticConfig",
    "SyntheticSettings",
    "Text",
    "build_synthetic_dataset",
    "build_then_rename",
    "describe",
    "generate_sample",
    "generate_split",
    "iter_samples",
    "recorded_settings",
    "render_scene",
    "sample_rng",
    "side_of",
    "simple_config",
    "synthetic_features",
]
