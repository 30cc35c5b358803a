"""Command-line tools: `nanovlm-generate` (answer a prompt about images) and `nanovlm-convert` (import an original
nanoVLM checkpoint; `convert_weights` holds its state-dict mapping)."""
