"""The brief recovery training after fusion, and its distillation variant.

One loop in the spirit of nanoGPT's train.py: AdamW (weight decay on
matrices only), linear warm-up then cosine decay to zero, cycling over the
train split in shuffled epochs (text batches grouped by length). With `teachers`, the loss is

    (1 - alpha) * task_loss + alpha * T^2 * KL(mean teacher probs/T || student/T)

(Hinton et al.'s distillation against the teachers' averaged softened
distribution; for masked LM only the masked positions count, for causal LM
every position that predicts a next token: the logits at t score the token
at t + 1).

A headless model (BertModel, ViTModel, a sentence-transformers checkpoint)
has no task loss: it trains on the similarity-distillation loss of its
pooled embeddings against the teachers' (otcompress.embedding), which it
therefore needs; `distill_alpha` and `temperature` do not apply.

The loop runs through Hugging Face `accelerate`: started by `accelerate
launch` it trains with DDP, one shard of every batch per process (the same
global batches, losses and schedule as one process), in the mixed precision
the launch asks for (`--mixed_precision bf16`). A plain single process keeps
the device it is given and trains exactly as it always has.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from otcompress import embedding
from otcompress.architectures import family_or_none, is_causal_lm
from otcompress.data import TaskData
from otcompress.errors import DivergedError, InvalidOptionError

IGNORE = -100  # label of positions without a target (unmasked MLM tokens)
SHARDING_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate launch modes refused


def _check_options(steps, lr, batch_size, distill_alpha, temperature, weight_decay, warmup):
    checks = [
        (isinstance(steps, int) and steps >= 0, f"steps must be an integer >= 0, got {steps!r}"),
        (lr > 0, f"lr must be > 0, got {lr}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (0.0 <= distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {distill_alpha}"),
        (temperature > 0, f"temperature must be > 0, got {temperature}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (0.0 <= warmup <= 1.0, f"warmup must be a fraction in [0, 1], got {warmup}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidOptionError(message)


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine to zero."""
    warm = math.ceil(warmup * steps)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


CLIMB = 1.25  # the loss after warm-up this many times the start's own: the run diverges
# ... and by more than this much: a start that already matches its teachers (loss ~0) moves
# by about lr whatever the gradient, so any loss at all would be "CLIMB times" its own.
CLIMB_FLOOR = 1e-3  # the embedding loss's collapses measured here: 0.024 -> 0.040, 0.029 -> 0.048
BACK_OFF = 10  # a diverging run restarts at lr / BACK_OFF


def climb_check(steps: int, warmup: float) -> int:
    """The step by which a run shows whether it climbs: twice the warm-up
    (the peak lr has acted for as many steps as it took to reach it), at
    least 10 and at most half the run."""
    return min(steps // 2, max(10, 2 * math.ceil(warmup * steps)))


def climb_window(check: int) -> int:
    """How many steps before `check` the climb is averaged over: a quarter."""
    return max(1, check // 4)


def climb(start_loss: float, losses: list, check: int):
    """(`start_loss`, the mean training loss over the climb window before
    `check`) where the latter is CLIMB times the former and more than
    CLIMB_FLOOR above it, else None. `start_loss` is the start's own loss on
    the window's batches (`Trainer.loss_before`): a pair on the same batches,
    so batch-to-batch noise is no climb. Each batch is scored before the step
    that trains on it, so in the first epoch both are losses on batches the
    model has not trained on."""
    window = climb_window(check)
    if len(losses) < check or check < 1:
        return None
    then = sum(losses[check - window:check]) / window
    return (start_loss, then) if then > max(CLIMB * start_loss, start_loss + CLIMB_FLOOR) else None


def _optimizer(model, lr, weight_decay):
    # As nanoGPT: decay matrices (weights, embeddings), not biases or norms.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed dropout etc. without disturbing the caller's global RNG."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _train_batches(data: TaskData, batch_size: int, seed: int):
    """Shuffled epochs forever; each epoch gets its own order (and MLM masks).
    Text is grouped by length: padding to 128 tokens made steps ~3x slower."""
    drop_last = data.num_examples("train") >= batch_size  # no tiny tail batches
    epoch = 0
    while True:
        yield from data.batches("train", batch_size, shuffle=True, drop_last=drop_last,
                                group_by_length=True, seed=seed * 1_000_003 + epoch)
        epoch += 1


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _logits(model, batch: dict, **options) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, **options)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InvalidOptionError(f"{type(model).__name__} has no task head (no logits); "
                                 "load it with a *ForImageClassification / *ForMaskedLM / "
                                 "*ForSequenceClassification / *ForCausalLM (GPT2LMHeadModel) class")
    return logits


def _masked_lm_head(model):
    """The vocabulary head its family names for `model`'s class (its
    MASKED_LM_HEAD, e.g. BertForMaskedLM's `cls`), None where it names none."""
    fam = family_or_none(getattr(model, "config", None))
    attribute = getattr(fam, "MASKED_LM_HEAD", {}).get(type(model).__name__)
    return getattr(model, attribute, None) if attribute else None


def _scored(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the positions that carry a label, flattened. A
    causal LM's logits are shifted: position t predicts the label at t + 1."""
    labels = batch["labels"]
    if labels.dim() == 2 and is_causal_lm(model):
        # No KV cache: a training or scoring pass never generates.
        logits = _logits(model, batch, use_cache=False)[:, :-1]
        labels = labels[:, 1:]
        keep = labels != IGNORE
        return logits[keep], labels[keep]
    keep = labels != IGNORE
    head = _masked_lm_head(model)
    if labels.dim() == 2 and head is not None:
        # The vocabulary head dominates a small model's step: apply it only
        # where a label is (the family names the head; pydoc steps 35% faster).
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return head(model.base_model(**inputs).last_hidden_state[keep]), labels[keep]
    logits = _logits(model, batch)
    return logits.reshape(-1, logits.shape[-1])[keep.reshape(-1)], labels[keep]


def _distill_loss(student: torch.Tensor, teacher_logits: list[torch.Tensor], temperature):
    teacher_probs = torch.stack([F.softmax(t / temperature, -1) for t in teacher_logits]).mean(0)
    log_student = F.log_softmax(student / temperature, -1)
    # T^2 keeps the gradient scale independent of T (Hinton et al. 2015).
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature ** 2


def _step_loss(score, teachers, batch, alpha, temperature, autocast=None, pooling=None):
    """(loss, task loss) of one batch: `score(batch)` gives the student's
    (logits, labels), or (embeddings, None) with `pooling`; teachers run
    without gradients (under `autocast`, the student's mixed precision, when
    given)."""
    if pooling is not None:
        return _embedding_loss(score, teachers, batch, pooling, autocast)
    logits, labels = score(batch)
    task = F.cross_entropy(logits, labels)
    if not teachers or alpha == 0.0:
        return task, task
    with torch.no_grad(), (autocast() if autocast is not None else _nothing()):
        teacher_logits = [_scored(t, batch)[0].float() for t in teachers]
    for t, tl in zip(teachers, teacher_logits):
        if tl.shape != logits.shape:
            raise InvalidOptionError(f"teacher {type(t).__name__} outputs {tuple(tl.shape)[-1]} "
                                     f"classes; the student outputs {logits.shape[-1]}")
    loss = (1 - alpha) * task + alpha * _distill_loss(logits, teacher_logits, temperature)
    return loss, task


def _embedding_loss(score, teachers, batch, pooling, autocast=None):
    """The similarity loss over the whole batch: under DDP every process
    gathers all processes' embeddings (gradients flow back to its own rows),
    so each computes the one-process loss."""
    student, _ = score(batch)
    with (autocast() if autocast is not None else _nothing()):
        targets = [_gathered(t) for t in embedding.teacher_embeddings(teachers, batch, pooling)]
    loss = embedding.similarity_loss(_gathered(student, differentiable=True), targets)
    return loss, loss  # no task loss besides it


def _finite_outputs(model, batch, pooling=None) -> bool:
    """Whether `model`'s logits (or pooled embeddings) on `batch` are all finite."""
    with torch.no_grad():
        out = embedding.teacher_embeddings([model], batch, pooling)[0] if pooling else _scored(model, batch)[0]
    return bool(torch.isfinite(out).all())


def _gathered(rows: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """Every process's rows, in rank order (equal counts: see Trainer)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    if differentiable:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(rows))
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


@contextmanager
def _nothing():
    yield


def _summary(losses: list[float], task_losses: list[float], seconds: float) -> dict:
    tail = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "final_loss": sum(losses[-tail:]) / tail if losses else None,  # mean of the last 10%
        "final_task_loss": sum(task_losses[-tail:]) / tail if losses else None,
        "losses": losses,
    }


def finetune(model, data: TaskData, *, steps: int, lr: float = 1e-3, batch_size: int = 64,
             seed: int = 0, teachers=None, distill_alpha: float = 0.5,
             temperature: float = 2.0, weight_decay: float = 0.01, warmup: float = 0.1,
             device="cpu", progress=None) -> dict:
    """Train `model` in place for `steps` steps on `data`'s train split.

    Returns steps, seconds, first/last loss, final_loss (mean of the last
    10% of steps), final_task_loss (the same without the distillation term)
    and the per-step losses. The model is left on `device` in eval mode;
    teachers are put in eval mode. Deterministic given `seed` on CPU.
    """
    trainer = Trainer(model, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      teachers=teachers, distill_alpha=distill_alpha, temperature=temperature,
                      weight_decay=weight_decay, warmup=warmup, device=device, progress=progress)
    return trainer.run(steps).summary()


class Trainer:
    """One `steps`-step run (schedule, optimizer, batch order, dropout RNG)
    that can be advanced in pieces: `run(10)` then `run(90)` trains exactly
    like `run(100)`. The start-point race of `pipeline` spends the first steps
    of the real run on every candidate and continues the winner.

    The step runs through an `accelerate.Accelerator` (`accelerator`, or one
    made here). Under `accelerate launch` with several processes the model is
    wrapped in DDP on `accelerator.device` (`device="cpu"`: CPU processes with
    gloo), every process takes its shard of each batch and the losses are
    weighted so that the gradient is the whole batch's; reported losses are
    the whole batch's. `mixed_precision` ("no", "bf16", "fp16"; default:
    what `accelerate launch` or its config set) autocasts the student's and
    the teachers' forward passes. A single process trains on `device`, as
    before accelerate."""

    def __init__(self, model, data: TaskData, *, steps: int, lr: float = 1e-3, batch_size: int = 64,
                 seed: int = 0, teachers=None, distill_alpha: float = 0.5, temperature: float = 2.0,
                 weight_decay: float = 0.01, warmup: float = 0.1, device="cpu", progress=None,
                 mixed_precision=None, accelerator=None):
        _check_options(steps, lr, batch_size, distill_alpha, temperature, weight_decay, warmup)
        self.model, self.steps, self.lr, self.warmup = model, steps, lr, warmup
        self.alpha, self.temperature, self.progress = distill_alpha, temperature, progress
        # A headless model's pooler (BertModel, ViTModel) is not part of its embedding: under DDP
        # parameters without gradients must be declared.
        acc = accelerator or _accelerator(torch.device(device), mixed_precision,
                                          unused_parameters=getattr(data, "task", None) == "feature-extraction")
        self.accelerator, self.world, self.rank = acc, acc.num_processes, acc.process_index
        if acc.distributed_type.value in SHARDING_ENGINES:
            # Sharded parameters would reach save_pretrained as shards (untested: no GPUs here).
            raise InvalidOptionError(f"{acc.distributed_type.value} is not supported yet: launch with DDP "
                                     "(accelerate launch --multi_gpu)")
        # One process keeps the caller's device (accelerate's is process-wide);
        # a launched process trains where accelerate put it.
        self.device = acc.device if self.world > 1 else torch.device(device)
        if self.world > 1 and batch_size < self.world:
            raise InvalidOptionError(f"batch_size {batch_size} is smaller than the {self.world} processes")
        if self.world > 1 and data.task == "feature-extraction" and (
                batch_size % self.world or data.num_examples("train") < batch_size):
            # Every process gathers the batch's embeddings: equal shares of full batches
            # (with fewer examples than a batch, the one batch would be partial).
            raise InvalidOptionError(f"a headless model's embedding objective on {self.world} processes needs "
                                     f"batch_size a multiple of {self.world} and at least batch_size training "
                                     f"examples (batch_size {batch_size}, {data.num_examples('train')} examples)")
        if acc.mixed_precision != "no" and acc.device.type != self.device.type:
            raise InvalidOptionError(f"mixed precision {acc.mixed_precision}: this process's accelerate state "
                                     f"is on {acc.device.type}, the model on {self.device.type}")
        self.teachers = list(teachers or [])
        self.pooling = data.pooling if data.task == "feature-extraction" else None
        if self.pooling is not None and not self.teachers:
            raise InvalidOptionError(f"{type(model).__name__} has no task head: it trains by distilling its "
                                     "teachers' embeddings, and none were given")
        model.to(self.device)
        for t in self.teachers:
            t.to(self.device).eval()
        # The student's scoring as one module: what DDP wraps and accelerate autocasts
        # (the caller's model itself is left unpatched).
        self.scorer, self.optimizer = acc.prepare(_Scorer(model, self.pooling),
                                                  _optimizer(model, lr, weight_decay))
        self.data, self.batches = data, _train_batches(data, batch_size, seed)
        self.batch_size, self.seed = batch_size, seed
        self.done, self.seconds, self.losses, self.task_losses = 0, 0.0, [], []
        self.restart = None  # set by `pipeline._train` on a run that restarted after its loss climbed
        with _seeded(seed + 1_000_003 * self.rank, self.device):  # dropout differs between processes
            self.rng = _rng_state(self.device)

    def use_data(self, data: TaskData) -> "Trainer":
        """Draw the remaining steps' batches from `data` (the schedule and the
        optimizer carry on): the race's winner continues on every example."""
        self.batches = _train_batches(data, self.batch_size, self.seed + 1)
        return self

    def run(self, n: int) -> "Trainer":
        """Train the next `n` steps (fewer if the run ends); eval mode afterwards."""
        n = max(0, min(n, self.steps - self.done))
        start = time.perf_counter()
        if n:
            with _seeded(0, self.device):  # the caller's RNG is left alone
                _set_rng_state(self.device, self.rng)
                self.scorer.train()
                for _ in range(n):
                    self._step()
                self.rng = _rng_state(self.device)
        self.model.eval()
        self.scorer.eval()
        self.seconds += time.perf_counter() - start
        return self

    def loss_before(self, n: int, skip: int = 0) -> float:
        """The model's mean loss, as it is now, on `n` batches of this run's
        stream after its first `skip` (in training mode, as the steps score
        them), without training on them: the run's stream and RNG are untouched."""
        batches, total = _train_batches(self.data, self.batch_size, self.seed), 0.0
        for _ in range(skip):
            next(batches)
        with _seeded(self.seed + 7, self.device), torch.no_grad():
            self.scorer.train()
            for _ in range(n):
                batch = _to(next(batches), self.device)
                total += float(_step_loss(self.scorer, self.teachers, batch, self.alpha, self.temperature,
                                          self.accelerator.autocast, self.pooling)[0])
        self.scorer.eval()
        self.model.eval()
        return total / n

    def _not_finite(self, step, batch):
        """Raises why the loss is NaN/Inf: a teacher's outputs, the model's own
        before any update (its weights or the data), or only then the learning
        rate (DivergedError: `pipeline._train` may restart at a lower one)."""
        for k, t in enumerate(self.teachers, 1):
            if not _finite_outputs(t, batch, self.pooling):
                raise InvalidOptionError(f"finetune: teacher {k}'s outputs are not finite (NaN/Inf) on a training "
                                         "batch: the teacher is broken, not the learning rate")
        if step == 0 and not _finite_outputs(self.model, batch, self.pooling):
            raise InvalidOptionError("finetune: the model's outputs are not finite (NaN/Inf) before any training "
                                     "step: its weights or the data are broken, not the learning rate")
        if step == 0:  # no update has happened: no lr can be to blame
            raise InvalidOptionError("finetune: the loss is not finite (NaN/Inf) before any training step, though "
                                     "the model's and the teachers' outputs are: the data or the loss is broken")
        raise DivergedError(f"finetune: loss is not finite at step {step} (lr={self.lr}); try a lower lr")

    def _step(self):
        step = self.done
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.steps, self.lr, self.warmup)
        batch = next(self.batches)
        if self.world > 1:
            batch, share = _shard(batch, self.rank, self.world)
        batch = _to(batch, self.device)
        loss, task = _step_loss(self.scorer, self.teachers, batch, self.alpha,
                                self.temperature, self.accelerator.autocast, self.pooling)
        if self.world > 1:
            # DDP averages gradients over processes: weighting each process's mean
            # loss by its share of the batch's scored positions makes that average
            # the gradient of the whole batch's mean loss (as one process computes it).
            if share == 0:  # nothing scored here: a zero loss that still reaches every parameter
                loss = task = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            both = self.accelerator.reduce(torch.stack([loss.detach(), task.detach()]).float() * share, "sum")
            loss_value, task_value = both.tolist()
            loss = loss * (share * self.world)
        else:
            loss_value, task_value = loss.item(), task.item()
        if not math.isfinite(loss_value):
            self._not_finite(step, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.losses.append(loss_value)
        self.task_losses.append(task_value)
        self.done += 1
        if self.progress is not None and self.accelerator.is_main_process:
            self.progress(self.done, self.steps, {"loss": self.losses[-1],
                                                  "lr": self.optimizer.param_groups[0]["lr"]})

    def summary(self) -> dict:
        return _summary(self.losses, self.task_losses, self.seconds)


class _Scorer(torch.nn.Module):
    """The student's (logits, labels) at its scored positions, or with
    `pooling` its (embeddings, None), as a module."""

    def __init__(self, model, pooling=None):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, batch):
        if self.pooling is not None:
            return embedding.embed(self.model, batch, self.pooling), None
        return _scored(self.model, batch)


def _launched() -> bool:
    """Started as one of several processes (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a launched group: the one
    that writes outputs and prints."""
    return not _launched() or int(os.environ.get("RANK", "0")) == 0


def _accelerator(device: torch.device, mixed_precision=None, unused_parameters=False):
    """An Accelerator for one Trainer. accelerate's state is per process: a
    launched process gets its device and process group from it; a single
    process keeps placing models itself (`device_placement=False`), so that
    Trainers on different devices can share one process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    if mixed_precision is not None and mixed_precision not in ("no", "bf16", "fp16"):
        raise InvalidOptionError(f"mixed precision '{mixed_precision}': use no, bf16 or fp16")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise InvalidOptionError("fp16 mixed precision needs a GPU; use bf16 on CPU")
    kwargs = {"mixed_precision": mixed_precision}
    if _launched():
        from accelerate.utils import DistributedDataParallelKwargs
        kwargs["cpu"] = device.type == "cpu"
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)]
    else:
        kwargs["device_placement"] = False
        # cpu=True only decides a fresh state's device; asking it of a state that
        # accelerate already set up on a GPU is an error, and irrelevant here.
        kwargs["cpu"] = device.type == "cpu" and not AcceleratorState._shared_state
    try:
        return Accelerator(**kwargs)
    except ValueError as e:  # e.g. another mixed precision than this process's accelerate state
        raise InvalidOptionError(f"accelerate: {e}") from None


def _shard(batch: dict, rank: int, world: int) -> tuple[dict, float]:
    """This process's rows of a batch (every world-th from `rank`), and its
    share of the batch's scored positions. Embeddings (no labels): 1/world,
    as every process computes the whole batch's loss (`_embedding_loss`)."""
    mine = {k: v[rank::world] for k, v in batch.items()}
    if "labels" not in batch:
        return mine, 1 / world
    labels = batch["labels"]
    total = int((labels != IGNORE).sum())
    return mine, (int((mine["labels"] != IGNORE).sum()) / total if total else 0.0)


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextlib.contextmanager
def _moved(device, *models):
    """The models on `device` in eval mode for the block, then back on their own
    device and in their own mode. Moved outside inference mode: a model moved
    inside it gets inference-tensor parameters, which training can no longer
    use (CUDA finetune after eval)."""
    before = [(m, m.training, {p.device for p in m.parameters()}) for m in models]
    for m in models:
        m.to(device).eval()
    try:
        yield
    finally:
        for m, was_training, devices in before:
            if len(devices) == 1:  # a model spread over devices (device_map) is left where it is
                m.to(next(iter(devices)))
            m.train(was_training)


def evaluate_ensemble(models, data: TaskData, *, split: str = "eval", batch_size: int = 256,
                      device="cpu") -> dict:
    """The ensemble of `models`, the mean of their predicted distributions (K
    forward passes a batch): the reference a fused model is set against.
    Scored as `evaluate` scores one model, with the same keys (loss = mean
    cross-entropy of the averaged distribution, probabilities clamped at
    1e-12). Headless models have no distributions to average."""
    if data.task == "feature-extraction":
        raise InvalidOptionError("an ensemble of headless models has no predictions to average")
    nll, correct, count = 0.0, 0, 0
    with _moved(device, *models), torch.inference_mode():
        for batch in data.batches(split, batch_size):
            batch = _to(batch, device)
            probs, labels = None, None
            for model in models:
                logits, labels = _scored(model, batch)
                p = torch.softmax(logits.float(), -1)
                probs = p if probs is None else probs + p
            probs = probs / len(models)
            nll += float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).sum())
            correct += int((probs.argmax(-1) == labels).sum())
            count += labels.numel()
    return _metrics(data.task, nll, correct, count)


def evaluate(model, data: TaskData, *, split: str = "eval", batch_size: int = 256,
             device="cpu", reference=None, progress=None, probe: bool = True) -> dict:
    """Classification: accuracy and mean cross-entropy over examples.
    Masked LM: mean cross-entropy over masked tokens, its perplexity and the
    masked-token accuracy (eval masks are fixed, so this is deterministic).
    Causal LM: mean next-token cross-entropy over every predicted token (all
    but each text's first, padding excluded), its perplexity, the top-1
    next-token accuracy and the number of predicted tokens.
    Feature extraction (a headless model): its embeddings against the
    `reference` models' (`embedding.score`: loss, similarity_pearson); with
    `probe` and text data that carries the built-in probe sentences, also
    `probe_similarity_pearson`: the same agreement on general English, unlike
    the user's text (a model distilled on narrow text can agree with its
    parents there and not elsewhere).
    `progress(stage, done, total)` hears every batch scored.
    The models (and references) get their train/eval mode and device back
    afterwards: the caller's models are not left on `device`."""
    probe_data = data.probe_data() if probe and data.task == "feature-extraction" else None
    total = _batch_count(data, split, batch_size) + (_batch_count(probe_data, "eval", batch_size)
                                                     if probe_data is not None else 0)
    counted = _Counted(progress, f"evaluate ({split} split)", total)
    with _moved(device, model, *(reference or [])):
        if data.task == "feature-extraction":
            result = embedding.score(model, counted(data.batches(split, batch_size)), reference, data.pooling,
                                     device)
            if probe_data is not None:
                pearson = embedding.score(model, counted(probe_data.batches("eval", batch_size)), reference,
                                          data.pooling, device)["similarity_pearson"]
                # NaN here is no broken model (the loss above says that): all similarities were equal.
                result["probe_similarity_pearson"] = pearson if math.isfinite(pearson) else None
                result["probe_examples"] = probe_data.num_examples("eval")
            return result
        total_loss, correct, count = 0.0, 0, 0
        with torch.inference_mode():
            for batch in counted(data.batches(split, batch_size)):
                logits, labels = _scored(model, _to(batch, device))
                total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                count += labels.numel()
    return _metrics(data.task, total_loss, correct, count)


def check_trained(before: dict, after: dict, lr: float) -> None:
    """DivergedError where finetuning left the model's outputs NaN/Inf on the
    data (`after`'s loss not finite) though they were finite before: the
    weights grew past what float32 holds through the logits (lr 1e4: every
    weight ~1e7 after 3 steps, each training loss still finite). Nothing is
    written then, as for a loss that went NaN while training."""
    if math.isfinite(before.get("loss", 0.0)) and not math.isfinite(after.get("loss", 0.0)):
        raise DivergedError(f"finetune: the model's outputs are not finite after training (lr={lr:g}); "
                            "nothing written; try a lower lr")


def _metrics(task: str, total_loss: float, correct: int, count: int) -> dict:
    """`evaluate`'s figures from the summed cross-entropy, the hits and the
    number of scored examples (or tokens)."""
    loss = total_loss / max(count, 1)
    if task in ("masked-lm", "causal-lm"):
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(count, 1),
                "tokens": count}
    return {"accuracy": correct / max(count, 1), "loss": loss, "examples": count}


def _batch_count(data: TaskData, split: str, batch_size: int) -> int:
    """How many batches `data.batches(split, batch_size)` yields ("all": each split's own)."""
    splits = ("train", "eval") if split == "all" else (split,)
    return sum(math.ceil(data.num_examples(s) / batch_size) for s in splits)


class _Counted:
    """Wraps batch iterators so that `progress(stage, done, total)` hears each
    batch, counted across every iterator wrapped (scored data, then probe)."""

    def __init__(self, progress, stage, total):
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0

    def __call__(self, batches):
        for batch in batches:
            yield batch
            self.done += 1
            if self.progress is not None:
                self.progress(self.stage, self.done, self.total)
