"""Data pipeline: FineVision-schema rows -> samples -> packs -> batches.

`sources` loads rows (local or streamed, sharded per rank), `conversations` turns a row into chat messages,
`samples` measures and builds training samples, `readers` serves them to `packing` (map-style or streamed),
which groups them into packs, `collator` makes batches;
`synthetic` generates the embedded demo dataset."""

from .collator import PackedCollator
from .conversations import RatingThresholds
from .packing import PackedDataset, combine_pack_states, knapsack_pack
from .readers import SampleDataset, SampleStream
from .samples import SampleBuilder, SkipCounter
from .sources import load_finevision, shard_for_rank, split_train_val

__all__ = [
    "PackedCollator",
    "PackedDataset",
    "RatingThresholds",
    "SampleBuilder",
    "SampleDataset",
    "SampleStream",
    "SkipCounter",
    "combine_pack_states",
    "knapsack_pack",
    "load_finevision",
    "shard_for_rank",
    "split_train_val",
]
