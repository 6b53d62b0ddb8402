"""Paired benchmarks for shira-jax: `make bench` (`python -m benchmarks.run`) -> BENCHMARKS.md.

Every figure is a ratio against a baseline measured in the same run: the contenders run
interleaved (A B A B ...), each timed after warm-up, and the figure is the ratio of their
medians. PyTorch contenders run in a child process driven call by call from the benchmark
process (`torch_worker`), so the two runtimes' thread pools do not fight. Modules:

* `train_step`: SHiRA train step vs frozen base, nnx.LoRA, PEFT-torch SHiRA and LoRA; compiled
  temp memory (`compiled.memory_analysis().temp_size_in_bytes`).
* `switching`: merged-mode adapter switching vs LoRA fuse/unfuse, PEFT merge/unmerge and the raw
  scatter bound (square d x d, a Llama-7B-shaped layer, a whole SmolLM2-shaped model).
* `mask_generation`: the PEFT-exact random mask vs PEFT's own `random_mask`.
* `bridge_load`: loading a ~9M-value PEFT SHiRA adapter, and base weights vs numpy safetensors.
"""
