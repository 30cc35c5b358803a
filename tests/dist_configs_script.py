"""Run by test_data_sources.py under `torchrun --nproc_per_node 2`: rank 1 fails to load config "b" (a transient
error), rank 0 loads it. Each rank writes what `load_finevision` did to {output_dir}/rank{r}.txt.

argv: output_dir data_root
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState

import nanovlm.data.sources as sources


def main() -> None:
    out, root = Path(sys.argv[1]), sys.argv[2]
    state = PartialState(cpu=True)  # what Trainer's arguments set up: a gloo process group on CPU
    if state.process_index == 1:
        real = sources._load_one

        def flaky(source, config, *args, **kwargs):
            if config == "b":
                raise ConnectionError("503 from the hub (transient)")
            return real(source, config, *args, **kwargs)

        sources._load_one = flaky
    try:
        ds = sources.load_finevision(root, configs=["a", "b"])
        result = f"loaded {len(ds)} rows"
    except ValueError as err:
        result = f"ValueError: {err}"
    (out / f"rank{state.process_index}.txt").write_text(result)


if __name__ == "__main__":
    main()
