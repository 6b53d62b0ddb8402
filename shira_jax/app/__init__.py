"""The `shira-jax` application: the command line, the fine-tuning job, its data and plots.

The top layer of shira_jax and the only part that may import `bridge` (the PyTorch / HF
side), `matplotlib`, `tokenizers` and `tqdm`. It uses the core through its public API only;
`import shira_jax` never imports this package.

    cli.py          the `shira-jax` command: parser generated from option dataclasses
    flags.py        dataclass fields -> argparse flags, and the parsed flags -> a dataclass
    options.py      FinetuneConfig (every finetune flag, with its help) and its cheap checks
    source.py       model and tokenizer from `--model`; does the adapter fit the model
    data.py         text loading (Shakespeare, .txt), tokenizing, packing, batches
    steps.py        loss, optimizer, jitted train and eval steps
    loop.py         TrainState and the train loop with its hooks (log, eval, save, Ctrl-C)
    checkpoints.py  the training checkpoint (adapter + optimizer + state) for `--resume`
    plots.py        the loss curve
    finetune.py     the job: prepare -> resume -> train loop -> export
    generate.py     text generation with the KV cache; finding an adapter folder
    demo.py         a small NNX model adapted with SHiRA on synthetic data
"""
