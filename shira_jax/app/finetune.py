"""Fine-tune a causal LM with a SHiRA adapter: the job behind `shira-jax finetune`.

`run(FinetuneConfig(...))` reads top to bottom as four phases:

    prepare   check every flag cheaply, load the model and its tokenizer, tokenize and pack
              the text, place the model on a device mesh (`--mesh`)
    resume    a new adapter, or the checkpoint's (same indices, values, history, optimizer)
    train     AdamW (warmup, cosine decay, clipping) in a jitted step with donated buffers;
              hooks log, evaluate, checkpoint and stop on Ctrl-C (`shira_jax.app.loop`)
    export    the checkpoint; unless interrupted, the eval after training and the adapter
              (orbax, PEFT); then `report` writes the metrics and the plot:

    OUT/metrics.json     train_loss per step, eval losses (and exact-match accuracy with
                         --eval-generate), tokens/s, the config
    OUT/loss.png         the loss curve
    OUT/orbax/           the adapter (`shira_jax.load_adapter`)
    OUT/peft/            the adapter as a PEFT SHiRA folder (`PeftModel.from_pretrained`)
    OUT/checkpoint/      adapter + optimizer state + step, for `--resume`

`--data` may also be a `.jsonl` file or folder of prompt/completion or chat records
(`shira_jax.app.sft`): the loss then counts completion / assistant tokens, examples are
packed into rows with segment ids, and `--eval-generate` scores greedy answers.

With `--mesh data=2,model=4` (any axes, see `shira_jax.sharding`) the model, adapter,
optimizer state and batches are placed on a device mesh and the steps run under it;
`--distributed` first calls `jax.distributed.initialize()` (one process per host; JAX finds
the coordinator), or `--coordinator HOST:PORT --num-processes N --process-id I` names it.

Example (bad input fails before any long work, with one line):
    >>> from shira_jax.app import finetune
    >>> try:
    ...     finetune.run(finetune.FinetuneConfig(data="/no/such/corpus.txt"))
    ... except finetune.FinetuneError as err:
    ...     print(str(err).split(" (")[0])
    data path '/no/such/corpus.txt' does not exist
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shira_jax as sj
from shira_jax import atomic, sharding
from shira_jax.app import answers, lm, sft, source
from shira_jax.app import data as data_lib
from shira_jax.app.checkpoints import (
    CHECKPOINT_DIR,
    check_resume,
    restore_optimizer,
    save_train_checkpoint,
)
from shira_jax.app.loop import CtrlC, ProgressBar, TrainState, every, train_loop, with_progress
from shira_jax.app.options import (
    FinetuneConfig,
    FinetuneError,
    check_batch_split,
    distributed_args,
    shira_config,
    targets_text,
    validate,
)
from shira_jax.app.plots import plot_losses
from shira_jax.app.steps import (
    lm_loss,
    make_accum_step,
    make_eval_fn,
    make_optimizer,
    make_sums_eval_fn,
    make_train_step,
    masked_loss,
)
from shira_jax.config import ShiraConfig

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "run"]

Log = Callable[[str], None]


@dataclasses.dataclass
class FinetuneResult:
    """What `run` produced: the metrics dict (as in metrics.json) and the output paths."""

    metrics: dict[str, Any]
    paths: dict[str, Path]
    interrupted: bool = False
    model: Any = None


class Timings(dict):
    """Seconds per phase (metrics.json's "seconds"), measured from `Timings()` on."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the model and batches live: one device (`mesh` None) or a device mesh."""

    mesh: jax.sharding.Mesh | None = None
    batch_axes: Any = None

    def place(self, batch: np.ndarray) -> Any:
        """A batch as the step takes it: unchanged, or split over the mesh's batch axes."""
        if self.mesh is None:
            return batch
        return jax.tree.map(self._place_array, batch)  # an array or a jsonl row dict

    def _place_array(self, batch: np.ndarray) -> Any:
        if jax.process_count() > 1:  # each process passes its share of the global batch
            n = len(batch) // jax.process_count()
            batch = batch[jax.process_index() * n : (jax.process_index() + 1) * n]
        return sharding.shard_batch(batch, self.mesh, self.batch_axes)

    def shard(self, tree: Any) -> None:
        if self.mesh is not None:
            sharding.shard_model(tree, self.mesh)

    def context(self) -> contextlib.AbstractContextManager:
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


@dataclasses.dataclass
class Job:
    """What `prepare` settled: the run's inputs, fixed from then on."""

    cfg: FinetuneConfig
    out: Path
    model_path: Path
    shira_cfg: ShiraConfig
    model: nnx.Module
    text: data_lib.TextData | sft.SFTData
    tokenizer: data_lib.Tokenizer
    batches: data_lib.Batches
    eval_set: list[Any]
    placement: Placement
    resume_meta: dict[str, Any] | None
    timings: Timings

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    @property
    def is_sft(self) -> bool:
        return isinstance(self.text, sft.SFTData)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


@dataclasses.dataclass
class Trainer:
    """The model with its optimizer and jitted step and eval functions."""

    model: nnx.Module
    optimizer: nnx.Optimizer
    step_fn: Callable[..., jax.Array]
    eval_fn: Callable[..., float]
    eval_set: list[Any]
    trainable: int
    total: int
    accuracy_fn: Callable[[nnx.Module], float] | None = None

    def step(self, batch: Any) -> float:
        return float(self.step_fn(self.model, self.optimizer, batch))

    def evaluate(self, state: TrainState | None = None) -> float:
        """The eval loss; with --eval-generate also the accuracy, appended to `state`."""
        if self.accuracy_fn is not None and state is not None:
            if not state.eval_accuracy or state.eval_accuracy[-1][0] != state.step:
                state.eval_accuracy.append((state.step, self.accuracy_fn(self.model)))
        return self.eval_fn(self.model, self.eval_set)


def run(
    cfg: FinetuneConfig,
    *,
    log: Log = print,
    progress: bool = True,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> FinetuneResult:
    """Run a fine-tuning job end to end (see the module docstring for what it writes).

    Every cheap check runs first (flags, data path, model name, targets, r), so bad input
    fails in about a second with a `FinetuneError` that is one line.

    Args:
        cfg: the job.
        log: where progress lines go.
        progress: show tqdm bars.
        on_step: called as `on_step(step, loss)` after each step; returning True stops the
            run as Ctrl-C does (checkpoint, metrics, `interrupted=True`).
    """
    job = prepare(cfg, log, Timings())
    state = resume(job, log, progress=progress)
    with job.placement.context():
        trainer = start_training(job, state, log)
        train(job, trainer, state, log=log, progress=progress, on_step=on_step)
        paths = export(job, trainer, state, log)
    metrics = report(job, trainer, state, paths, log)
    return FinetuneResult(metrics, paths, interrupted=state.interrupted, model=job.model)


# ----------------------------------------------------------------------------- prepare


def prepare(cfg: FinetuneConfig, log: Log, timings: Timings) -> Job:
    """Check everything that is cheap to check, then load the model and the data."""
    with timings.measure("check"):
        validate(cfg)
        init_args = distributed_args(cfg)
        if init_args is not None and not jax.distributed.is_initialized():
            jax.distributed.initialize(**init_args)  # before any device use
        out = Path(cfg.out).expanduser()
        resume_meta = check_resume(cfg, out / CHECKPOINT_DIR) if cfg.resume else None
        model_path = source.resolve_model(cfg.model)
        shira_cfg = shira_config(cfg, str(model_path))
        abstract = source.abstract_model(model_path)
        if abstract is not None:  # targets and r against the shapes alone
            source.check_adapter_fits(abstract, shira_cfg)
            _check_tunix_options(cfg, abstract)
        tokenizer = source.load_model_tokenizer(model_path)
        sft_data = _sft_data(cfg, model_path, tokenizer, log)  # bad jsonl fails here
    with timings.measure("load_model"):  # the long work starts here
        log(f"model   {cfg.model} ({model_path}), {cfg.dtype}")
        model = source.load_model(model_path, cfg.dtype)
        targets = source.check_adapter_fits(model, shira_cfg)  # instant; checks GGUF too
        source.keep_float32(model, targets)
        if cfg.quantize:
            if lm.is_tunix(model):
                raise FinetuneError("--quantize supports shira-jax's Llama models, not Tunix's")
            log(f"quantize {len(targets)} adapted kernels to {cfg.quantize} (qwix, weight-only)")
            model = source.quantize(model, targets, cfg.quantize)
        placement = _placement(cfg, model, log)
    with timings.measure("tokenize"):
        vocab = lm.vocab_size(model)
        text = _tokenize(cfg, tokenizer) if sft_data is None else sft_data
        _check_vocab(text.train, text.eval, vocab)
        batches = data_lib.Batches(text.train, cfg.batch_size * cfg.grad_accum, seed=cfg.seed)
        eval_set = data_lib.eval_batches(text.eval, cfg.batch_size)
    eval_set = [placement.place(b) for b in eval_set]
    if sft_data is None:
        log(
            f"data    {cfg.data}: {text.n_documents} documents, {text.n_tokens:,} tokens -> "
            f"{len(text.train):,} train / {len(eval_set) * cfg.batch_size} eval sequences of "
            f"{cfg.seq_len} tokens"
        )
    return Job(
        cfg=cfg,
        out=out,
        model_path=model_path,
        shira_cfg=shira_cfg,
        model=model,
        text=text,
        tokenizer=tokenizer,
        batches=batches,
        eval_set=eval_set,
        placement=placement,
        resume_meta=resume_meta,
        timings=timings,
    )


def _check_tunix_options(cfg: FinetuneConfig, model: nnx.Module) -> None:
    """Tunix models (`bridge.tunix`) train and export like ours; two options need our Llama."""
    if not lm.is_tunix(model):
        return
    name = type(model).__name__
    if cfg.eval_generate:
        raise FinetuneError(
            f"--eval-generate decodes with shira-jax's Llama KV cache; --model is Tunix's {name}"
            " (use Tunix's sampler on the trained model instead)"
        )
    if cfg.mesh:
        raise FinetuneError(
            f"--mesh annotates shira-jax's Llama; --model is Tunix's {name}, which carries its "
            "own sharding names (load it with bridge.tunix.from_pretrained(..., mesh=...))"
        )


def _placement(cfg: FinetuneConfig, model: nnx.Module, log: Log) -> Placement:
    """One device, or `--mesh`: the mesh, with the model's sharding annotated for it."""
    if not cfg.mesh:
        return Placement()
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as err:
        raise FinetuneError(f"--mesh: {err}") from None
    rules, batch_axes = sharding.mesh_rules(mesh)
    check_batch_split(cfg.batch_size, dict(mesh.shape))
    sharding.annotate(model, rules, mesh=mesh)
    log(f"mesh    {dict(mesh.shape)} over {jax.process_count()} process(es)")
    return Placement(mesh, batch_axes)


def _tokenize(cfg: FinetuneConfig, tokenizer: data_lib.Tokenizer) -> Any:
    """Text `--data` tokenized and packed."""
    try:
        text = data_lib.prepare(
            cfg.data,
            tokenizer,
            seq_len=cfg.seq_len,
            eval_fraction=cfg.eval_fraction,
            max_eval_sequences=cfg.eval_batches * cfg.batch_size,
        )
    except (FileNotFoundError, ValueError) as err:
        raise FinetuneError(str(err)) from err
    return text


def _check_vocab(train: Any, held: Any, vocab: int) -> None:
    """Every token id (of text rows or jsonl row dicts) must be in the model's vocabulary."""
    tokens = lambda rows: rows["tokens"] if isinstance(rows, dict) else rows  # noqa: E731
    top = max(int(tokens(train).max()), int(tokens(held).max()))
    if top >= vocab:
        raise FinetuneError(
            f"the tokenizer produced id {top} but the model's vocabulary has {vocab} entries"
        )


def _sft_data(
    cfg: FinetuneConfig, model_path: Path, tokenizer: data_lib.Tokenizer, log: Log
) -> sft.SFTData | None:
    """jsonl `--data` checked, templated, tokenized and laid out as rows; None for text."""
    if not sft.is_jsonl(cfg.data):
        return None
    try:
        data = sft.prepare(
            cfg.data,
            tokenizer,
            sft.load_chat_template(model_path),
            seq_len=cfg.seq_len,
            eval_source=cfg.eval_data,
            eval_fraction=cfg.eval_fraction,
            max_eval=cfg.eval_batches * cfg.batch_size,
            rows=cfg.rows,
            too_long=cfg.too_long,
            train_on_prompt=cfg.train_on_prompt,
        )
    except (FileNotFoundError, ValueError) as err:
        raise FinetuneError(str(err)) from err
    counts = {k: v for k, v in data.counts.items() if v}
    if counts:
        shown = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        log(f"data    over --seq-len {cfg.seq_len} or nothing to train on: {shown}")
    log(
        f"data    {cfg.data}: {data.n_examples} train examples ({data.n_tokens:,} tokens, "
        f"{data.template} template) -> {len(data.train['tokens']):,} {cfg.rows} rows of "
        f"{cfg.seq_len} tokens ({100 * data.fill:.0f}% filled); {data.n_eval_examples} eval "
        "examples"
    )
    return data


# ----------------------------------------------------------------------------- resume


def resume(job: Job, log: Log, *, progress: bool = True) -> TrainState:
    """The adapter and history to start from: the checkpoint's with `--resume` (same
    indices, values and losses), else a new adapter at step 0."""
    cfg = job.cfg
    with job.timings.measure("adapter"):
        if job.resume_meta is not None:
            adapter_dir = (job.ckpt_dir / "adapter").absolute()
            sj.load_adapter(job.model, adapter_dir, adapter_name=cfg.adapter_name)
            state = TrainState.from_checkpoint(job.resume_meta)
            log(f"resume  from {job.ckpt_dir} at step {state.step}")
        else:
            _add_adapter(job, log, progress=progress)
            state = TrainState()
        job.placement.shard(job.model)
    return state


def _add_adapter(job: Job, log: Log, *, progress: bool) -> None:
    """`apply_shira`; the gradient / snip masks score the first `--calib-batches` batches."""
    cfg, calibration = job.cfg, None
    if job.shira_cfg.needs_calibration:
        calibration = [
            jax.tree.map(jnp.asarray, job.batches.batch(i)) for i in range(cfg.calib_batches)
        ]
        log(f"mask    {cfg.mask}: calibrating on {len(calibration)} training batches")
        calibration = with_progress(calibration, "calibration", enabled=progress)
    sj.apply_shira(
        job.model,
        job.shira_cfg,
        cfg.adapter_name,
        loss_fn=None if calibration is None else masked_loss if job.is_sft else lm_loss,
        calibration_data=calibration,
    )


# ----------------------------------------------------------------------------- train


def start_training(job: Job, state: TrainState, log: Log) -> Trainer:
    """Count the parameters, evaluate before training (unless resumed), build the optimizer
    (restored from the checkpoint when resuming)."""
    cfg, model = job.cfg, job.model
    trainable, total = source.count_params(model)
    n_layers = len(list(sj.shira_layers(model)))
    log(
        f"adapter SHiRA r={cfg.r} mask={cfg.mask} on {n_layers} layers "
        f"({targets_text(job.shira_cfg.target_modules)}): {trainable:,} trainable of "
        f"{total:,} params ({100 * trainable / total:.3f}%)"
    )
    tx = make_optimizer(
        cfg.lr, cfg.steps, cfg.warmup, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm
    )
    optimizer = nnx.Optimizer(model, tx, wrt=sj.ShiraParam)
    if job.resume_meta is not None:
        restore_optimizer(job.ckpt_dir, optimizer, job.resume_meta)
    if lm.is_tunix(model):  # its weights are committed to a device: the rest alike (one compile)
        lm.commit_to_device(model, optimizer)
    job.placement.shard(optimizer)
    plain = not job.is_sft and cfg.grad_accum == 1  # the text path as it always was
    step_fn = make_train_step() if plain else make_accum_step(cfg.grad_accum)
    eval_fn = make_eval_fn() if not job.is_sft else make_sums_eval_fn()
    trainer = Trainer(model, optimizer, step_fn, eval_fn, job.eval_set, trainable, total)
    if cfg.eval_generate:
        pairs = job.text.eval_pairs
        trainer.accuracy_fn = lambda m: answers.accuracy(m, job.tokenizer, pairs)
    with job.timings.measure("eval_before"):
        if state.eval_before is None:
            state.eval_before = trainer.evaluate(state)
            state.eval_loss.append((0, state.eval_before))
    log(f"eval    before training: loss {state.eval_before:.4f}{_accuracy_text(state)}")
    return trainer


def _accuracy_text(state: TrainState, index: int = -1) -> str:
    """", exact match 42.0%" for the latest (or `index`-th) --eval-generate score, else ""."""
    if not state.eval_accuracy:
        return ""
    return f", exact match {100 * state.eval_accuracy[index][1]:.1f}%"


def train(
    job: Job,
    trainer: Trainer,
    state: TrainState,
    *,
    log: Log,
    progress: bool,
    on_step: Callable[[int, float], bool | None] | None,
) -> None:
    """Train up to `--steps`; hooks log, evaluate, checkpoint and stop on Ctrl-C/`on_step`."""
    cfg = job.cfg
    rate = lambda: state.tokens_per_s(job.tokens_per_step) or 0.0
    bar = ProgressBar(cfg.steps, state.step, enabled=progress, log=log, rate=rate)
    with bar, CtrlC() as ctrl_c:

        def check_finite(step: int, loss: float) -> None:
            if not math.isfinite(loss):
                raise FinetuneError(f"loss became {loss} at step {step}; lower --lr (now {cfg.lr})")

        def log_loss(step: int, loss: float) -> None:
            bar.write(f"step {step:5d}/{cfg.steps}  loss {loss:.4f}  {rate():,.0f} tok/s")

        def evaluate(step: int, _: float) -> None:
            state.eval_loss.append((step, trainer.evaluate(state)))
            shown = f"{state.eval_loss[-1][1]:.4f}{_accuracy_text(state)}"
            bar.write(f"step {step:5d}/{cfg.steps}  eval loss {shown}")

        def checkpoint(step: int, _: float) -> None:
            _save_checkpoint(job, trainer, state)

        log_every = cfg.log_every or max(1, cfg.steps // 10)
        hooks = [
            bar,
            check_finite,
            every(log_every, log_loss, last=cfg.steps, at_last=True),
            every(cfg.eval_every, evaluate, last=cfg.steps),
            every(cfg.ckpt_every, checkpoint, last=cfg.steps),
            *([on_step] if on_step is not None else []),
            ctrl_c,
        ]
        run_step = lambda i: trainer.step(job.placement.place(job.batches.batch(i)))
        train_loop(state, run_step, cfg.steps, hooks)
    job.timings["train"] = state.train_seconds
    if state.first_step_seconds is not None:
        job.timings["first_step_with_compile"] = state.first_step_seconds


def _save_checkpoint(job: Job, trainer: Trainer, state: TrainState) -> None:
    cfg = job.cfg
    meta = state.to_checkpoint(cfg.to_dict())
    save_train_checkpoint(
        job.ckpt_dir, trainer.model, trainer.optimizer, meta, adapter_name=cfg.adapter_name
    )


# ----------------------------------------------------------------------------- export


def export(job: Job, trainer: Trainer, state: TrainState, log: Log) -> dict[str, Path]:
    """Save the training checkpoint; unless interrupted, evaluate and write the adapter as an
    orbax checkpoint and (`export_peft`) a PEFT folder. Returns the paths written."""
    cfg, out, model = job.cfg, job.out, trainer.model
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with job.timings.measure("eval_after_and_export"):
        _save_checkpoint(job, trainer, state)
        paths["checkpoint"] = job.ckpt_dir
        if state.interrupted:
            return paths
        state.eval_after = trainer.evaluate(state)
        if not state.eval_loss or state.eval_loss[-1][0] != state.step:
            state.eval_loss.append((state.step, state.eval_after))
        log(
            f"eval    after {state.step} steps: loss {state.eval_after:.4f}"
            f"{_accuracy_text(state)} (before: {state.eval_before:.4f}"
            f"{_accuracy_text(state, 0)})"
        )
        sj.save_adapter(model, (out / "orbax").absolute(), adapter_name=cfg.adapter_name)
        paths["orbax"] = out / "orbax"
        if cfg.export_peft and job.is_main:
            import bridge

            bridge.save_peft_adapter(
                model,
                (out / "peft").absolute(),
                adapter_name=cfg.adapter_name,
                base_model_name_or_path=str(job.model_path),
            )
            paths["peft"] = out / "peft"
    return paths


def report(
    job: Job, trainer: Trainer, state: TrainState, paths: dict[str, Path], log: Log
) -> dict[str, Any]:
    """Write metrics.json and loss.png (main process) and log what was written."""
    job.timings["total"] = time.perf_counter() - job.timings.start
    metrics = _metrics(job, trainer, state)
    paths["metrics"] = job.out / "metrics.json"
    if job.is_main:
        atomic.write_json(job.out / "metrics.json", metrics, indent=1)
        if plot_losses(metrics, job.out / "loss.png"):
            paths["plot"] = job.out / "loss.png"
    if state.interrupted:
        log(
            f"interrupted at step {state.step}: checkpoint saved; continue with --resume "
            f"--out {job.out}"
        )
    _log_paths(paths, log)
    return metrics


def _metrics(job: Job, trainer: Trainer, state: TrainState) -> dict[str, Any]:
    cfg = job.cfg
    metrics = {
        "config": cfg.to_dict(),
        "model_path": str(job.model_path),
        "steps_done": state.step,
        "interrupted": state.interrupted,
        "train_loss": state.train_loss,
        "eval_loss_before": state.eval_before,
        "eval_loss_after": state.eval_after,
        "eval_loss": [list(e) for e in state.eval_loss],
        "tokens_per_s": state.tokens_per_s(job.tokens_per_step),
        "tokens_per_step": job.tokens_per_step,
        "trainable_params": trainer.trainable,
        "total_params": trainer.total,
        "data": _data_metrics(job),
        "seconds": {k: round(v, 2) for k, v in job.timings.items()},
        "backend": jax.default_backend(),
    }
    if state.eval_accuracy:
        metrics["eval_accuracy"] = [list(e) for e in state.eval_accuracy]
        metrics["eval_accuracy_before"] = state.eval_accuracy[0][1]
        done = state.eval_accuracy[-1][0] == state.step and not state.interrupted
        metrics["eval_accuracy_after"] = state.eval_accuracy[-1][1] if done else None
    if job.placement.mesh is not None:
        metrics["mesh"] = dict(job.placement.mesh.shape)
        metrics["processes"] = jax.process_count()
    return metrics


def _data_metrics(job: Job) -> dict[str, Any]:
    cfg, text = job.cfg, job.text
    if isinstance(text, sft.SFTData):
        return {
            "examples": text.n_examples,
            "eval_examples": text.n_eval_examples,
            "tokens": text.n_tokens,
            "template": text.template,
            "rows": cfg.rows,
            "train_rows": int(len(text.train["tokens"])),
            "row_fill": round(text.fill, 4),
            "eval_rows": int(len(job.eval_set) * cfg.batch_size),
            **text.counts,
        }
    return {
        "documents": text.n_documents,
        "tokens": text.n_tokens,
        "train_sequences": int(len(text.train)),
        "eval_sequences": int(len(job.eval_set) * cfg.batch_size),
    }


def _log_paths(paths: dict[str, Path], log: Log) -> None:
    rows = [
        ("metrics", "metrics    ", ""),
        ("plot", "loss plot  ", ""),
        ("orbax", "adapter    ", "  (shira_jax.load_adapter / shira-jax generate --adapter)"),
        ("peft", "PEFT       ", "  (peft.PeftModel.from_pretrained on the base model)"),
        ("checkpoint", "checkpoint ", "  (--resume)"),
    ]
    log("wrote")
    for key, label, note in rows:
        if key in paths:
            log(f"  {label}{paths[key]}{note}")
