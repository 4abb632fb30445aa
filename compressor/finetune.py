"""Brief fine-tuning of the rewritten model by distillation from the original one (the teacher).

The loss is KL on temperature-softened logits (x T^2, Hinton et al. 2015), mixed with cross-entropy
when labels exist (``alpha``), plus, when ``feature_weight`` > 0, a feature term: the relative squared
error between each rewritten layer's output and the original layer's output. The feature term is off
by default: on the shared ResNet-32 at 1/3 of the MACs (2-minute budgets, 1 thread, held-out test
images) the output distillation alone recovered 3.4 of the 3.8 points lost, with the feature term
(weight 1 or 5) 2.5-2.6; it also costs a fifth of the throughput.

The budget (``steps``, ``epochs``, ``max_minutes``; the first to run out ends training) also drives
the learning-rate schedule: linear warmup then cosine decay over the budget's *progress*, so a
time-budgeted run decays to zero exactly when its time is up. ``max_minutes`` covers the whole step,
held-out evaluations included: training stops when one more step and the final evaluation would not
fit. The best held-out weights seen (the initial ones included) are kept.

Under ``torchrun`` (``torch.distributed`` initialized) the student is wrapped in
``DistributedDataParallel`` and the training samples are sharded by a ``DistributedSampler``; DDP
broadcasts rank 0's weights at construction, so every rank starts from the same model even if the
rewrite differed in the last bit. Rank 0 decides when to stop and when to evaluate, and broadcasts
that with the loss in one all-reduce per step, so every rank runs the same schedule.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from compressor.batches import materialize
from compressor.data import Dataset
from compressor import tree
from compressor.errors import CompressorError, DataError
from compressor.export import flatten_outputs
from compressor.evaluate import Tally
from compressor.recipe import FineTune
from compressor.task import Task, check_labels, task_of

__all__ = ["Samples", "finetune", "resolve_device", "samples_of", "split_holdout", "state_digest"]

_CURVE_POINTS = 50


# ----------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Samples:
    """Random-access samples: ``take(positions)`` returns one ``(inputs, labels-or-None)`` batch."""

    take: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None]]
    count: int
    labeled: bool


def _tensors_of(data: Iterable, example_input: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    batches = materialize(data, example_input, 256, None, what)
    labeled = {labels is not None for _, labels in batches}
    if len(labeled) > 1:
        raise DataError(f"{what}: some batches carry labels and some do not; expected one kind throughout")
    inputs = torch.cat([x.detach().cpu() for x, _ in batches])
    labels = torch.cat([torch.as_tensor(y).cpu() for _, y in batches]) if labeled == {True} else None
    return inputs, labels


def samples_of(data, example_input: torch.Tensor, what: str) -> Samples:
    """Random access to ``data``: a :class:`~compressor.data.Dataset` reads on demand, anything else
    (tensors or ``(inputs, labels)`` batches) is gathered in memory once."""
    if isinstance(data, Samples):
        return data
    if isinstance(data, Dataset):
        count = data.count()
        if count == 0:
            raise DataError(f"{what}: no samples")
        return Samples(lambda positions: data.take(positions), count, data.labeled)
    inputs, labels = _tensors_of(data, example_input, what)

    def take(positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return inputs[index], None if labels is None else labels[index]

    return Samples(take, inputs.shape[0], labels is not None)


def split_holdout(data, holdout: int | float, seed: int, example_input: torch.Tensor) -> tuple[object, object]:
    """``(train, held_out)``: a deterministic shuffle (``seed``) of ``data`` cut in two disjoint parts.

    A :class:`~compressor.data.Dataset` is split as views (nothing is read); other data is gathered once.
    """
    if isinstance(data, Dataset):
        return data.split(holdout, seed)
    inputs, labels = _tensors_of(data, example_input, "fine-tuning data")
    total = inputs.shape[0]
    if total < 2:
        raise DataError(f"fine-tuning data: cannot split {total} sample(s) in two; expected at least 2 samples")
    if isinstance(holdout, int):
        if not 1 <= holdout < total:
            raise DataError(f"fine-tuning data: cannot hold out {holdout} of {total} samples; expected 1 to {total - 1}")
        count = holdout
    else:
        count = min(max(round(holdout * total), 1), total - 1)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(total))
    parts = []
    for rows in (order[count:], order[:count]):
        x, y = inputs[rows], None if labels is None else labels[rows]
        parts.append([(x[i : i + 256], None if y is None else y[i : i + 256]) for i in range(0, len(x), 256)])
    return parts[0], parts[1]


def _augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by 1/8 of each side, and a horizontal flip, per sample."""
    n, _, height, width = inputs.shape
    pad_h, pad_w = max(height // 8, 1), max(width // 8, 1)
    padded = F.pad(inputs, (pad_w, pad_w, pad_h, pad_h))
    tops = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator).tolist()
    flips = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.empty_like(inputs)
    for i, (top, left, flip) in enumerate(zip(tops, lefts, flips)):
        crop = padded[i, :, top : top + height, left : left + width]
        out[i] = crop.flip(-1) if flip else crop
    return out


# ----------------------------------------------------------------------------------------------------------------------
# devices and ranks


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``: CUDA when available (this process's ``LOCAL_RANK`` GPU under torchrun), else the CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise CompressorError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CompressorError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local % torch.cuda.device_count())
    elif device.type != "cpu":
        raise CompressorError(f"--device {name}: unsupported device type {device.type!r}; expected cpu or cuda")
    return device


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def state_digest(model: nn.Module) -> str:
    """sha256 over the state_dict's names and tensor bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# loss


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, temperature: float, alpha: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)`` (KL alone without labels).

    Class dimension 1, so dense outputs (N, C, H, W) are distilled per position (the KL is a mean
    over positions); labels equal to ``ignore_index`` add no cross-entropy.
    """
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1).mean() * temperature**2
    if labels is None or alpha == 1 or not bool((labels != ignore_index).any()):
        return kl
    return alpha * kl + (1 - alpha) * F.cross_entropy(student.float(), labels, ignore_index=ignore_index)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: scale-free, so outputs of any magnitude weigh alike."""
    return (student.float() - teacher.float()).pow(2).mean() / teacher.float().pow(2).mean().clamp_min(1e-12)


def output_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], labels: torch.Tensor | None, task: Task,
    temperature: float, alpha: float,
) -> torch.Tensor:
    """The task's weighted sum over outputs: :func:`distillation_loss` on the logits (the first output
    of a classification or segmentation model), :func:`normalized_mse` on every other output."""
    terms = []
    for index, (s, t, weight) in enumerate(zip(student, teacher, task.weights)):
        if weight == 0:
            continue
        if index == 0 and task.logits:
            term = distillation_loss(s, t, labels, temperature, alpha, task.ignore_index if task.kind == "segmentation" else -100)
        else:
            term = normalized_mse(s, t)
        terms.append(weight * term)
    return torch.stack(terms).sum()


def _feature_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    # Relative, so that layers with large activations do not drown out the others.
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12) for s, t in pairs]
    return torch.stack(terms).mean()


class _Capture:
    """Forward hooks recording the outputs of the rewritten stacks (student) and of the original convs
    (teacher), call by call: a module called twice yields two pairs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
        self.active = False
        self.student: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.teacher: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.handles = []
        for name in names:
            stack = tree.get_submodule(student, name)
            # The rewritten graph calls the stack's children one by one (name.0, name.1, ...), never the
            # Sequential itself: the last child's output is the stack's output on both graph paths.
            last = stack[-1] if isinstance(stack, nn.Sequential) and len(stack) else stack
            self.handles.append(last.register_forward_hook(self._hook(self.student[name])))
            self.handles.append(tree.get_submodule(teacher, name).register_forward_hook(self._hook(self.teacher[name])))

    def _hook(self, store: list[torch.Tensor]):
        def hook(_module, _inputs, output) -> None:  # must return None: a return value replaces the output
            if self.active:
                store.append(output)

        return hook

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        found = [pair for name in self.student for pair in zip(self.student[name], self.teacher[name])]
        for store in (*self.student.values(), *self.teacher.values()):
            store.clear()
        return found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------------------
# held-out evaluation


#: Teacher outputs of the held-out samples are cached up to this many elements (1 GiB of float32);
#: beyond it (large dense outputs) the teacher is re-run at each evaluation instead.
_CACHE_ELEMENTS = 2**28


class _HeldOut:
    """The task's metrics (:class:`compressor.evaluate.Tally`) against the teacher on this rank's shard
    of the held-out samples, summed over ranks. The teacher's outputs are cached when they fit."""

    def __init__(
        self, samples: Samples, teacher: nn.Module, device: torch.device, batch_size: int, rank: int, world: int, task: Task
    ) -> None:
        self.samples, self.device, self.teacher, self.task = samples, device, teacher, task
        positions = np.arange(samples.count)[rank::world]
        self.chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        per_sample = sum(math.prod(shape) for shape in task.shapes)
        self.cached: list[list[torch.Tensor]] | None = None
        if per_sample * len(positions) <= _CACHE_ELEMENTS:
            self.cached = [self._teacher(chunk) for chunk in self.chunks]

    def _teacher(self, chunk: np.ndarray) -> list[torch.Tensor]:
        inputs, _ = self.samples.take(chunk)
        with torch.no_grad():
            return [t.float() for t in flatten_outputs(self.teacher(inputs.to(self.device)))]

    def measure(self, student: nn.Module, world: int) -> dict:
        tally = Tally(self.task, self.device)
        was_training = student.training
        tree.set_training_(student, False)
        with torch.no_grad():
            for index, chunk in enumerate(self.chunks):
                inputs, labels = self.samples.take(chunk)
                reference = self.cached[index] if self.cached is not None else self._teacher(chunk)
                output = [t.float() for t in flatten_outputs(student(inputs.to(self.device)))]
                tally.add(reference, output, labels, "held-out data")
        tree.set_training_(student, was_training)
        if world > 1:
            for tensor in tally.tensors():
                if tensor.numel():  # the confusion matrices are empty unless the task is segmentation
                    dist.all_reduce(tensor)
        return tally.result()


def _score(metrics: dict) -> tuple[float, ...]:
    """Higher is better: accuracy (else agreement) first where the task has classes, then output error."""
    accuracy = metrics["accuracy_compressed"]
    primary = accuracy if accuracy is not None else metrics["agreement"]
    if primary is None:
        return (-metrics["output_rel_error"],)
    return (primary, metrics["agreement"], -metrics["output_rel_error"])


# ----------------------------------------------------------------------------------------------------------------------
# budget, schedule, interruption


class _Budget:
    """Progress in [0, 1] as the largest used fraction of steps, epochs and minutes."""

    def __init__(self, settings: FineTune, steps_per_epoch: int) -> None:
        self.steps = settings.steps
        self.epoch_steps = None if settings.epochs is None else max(1, math.ceil(settings.epochs * steps_per_epoch))
        self.seconds = None if settings.max_minutes is None else settings.max_minutes * 60

    def progress(self, step: int, elapsed: float) -> float:
        used = [step / limit for limit in (self.steps, self.epoch_steps) if limit]
        if self.seconds:
            used.append(elapsed / self.seconds)
        return min(max(used), 1.0)

    def stop_reason(self, step: int, elapsed: float, step_seconds: float, reserve_seconds: float) -> str | None:
        if self.steps is not None and step >= self.steps:
            return "steps"
        if self.epoch_steps is not None and step >= self.epoch_steps:
            return "epochs"
        # Stop while one more step and the final evaluation still fit in the time left.
        if self.seconds is not None and elapsed + step_seconds + reserve_seconds > self.seconds:
            return "max_minutes"
        return None


def _learning_rate(peak: float, warmup: float, progress: float) -> float:
    if warmup > 0 and progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    decay = (progress - warmup) / max(1 - warmup, 1e-12)
    return peak * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))


class _Interrupt:
    """The first Ctrl-C asks training to stop at the end of the current step (weights never half
    updated, and no rank leaves a collective early); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _Bar:
    """A rich progress bar on stderr (rank 0, TTY only): step, loss, learning rate, throughput, ETA."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("fine-tune"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("fine-tune", total=1.0, step=0, loss=float("nan"), lr=0.0, ips=0.0, eta="-")
        self.progress.start()

    def update(self, progress: float, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=progress, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _eta(progress: float, elapsed: float) -> str:
    if progress <= 0:
        return "-"
    left = int(elapsed * (1 - progress) / progress)
    return f"{left // 60}:{left % 60:02d}"


def _curve(losses: list[float]) -> dict:
    """The loss curve in at most ``_CURVE_POINTS`` bins of mean loss, with the first and last 10% means."""
    if not losses:
        return {"first": None, "last": None, "min": None, "curve": []}
    window = max(1, len(losses) // 10)
    bins = min(_CURVE_POINTS, len(losses))
    edges = np.linspace(0, len(losses), bins + 1).astype(int)
    curve = [[int(hi), float(np.mean(losses[lo:hi]))] for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    return {
        "first": float(np.mean(losses[:window])),
        "last": float(np.mean(losses[-window:])),
        "min": float(min(losses)),
        "curve": curve,
    }


# ----------------------------------------------------------------------------------------------------------------------
# the step


def _optimizer(model: nn.Module, settings: FineTune) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm/LayerNorm parameters: it only shrinks them towards zero.
    decay = [p for p in tree.parameters(model) if p.requires_grad and p.dim() > 1]
    other = [p for p in tree.parameters(model) if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.learning_rate, momentum=settings.momentum, nesterov=settings.momentum > 0)
    return torch.optim.AdamW(groups, lr=settings.learning_rate)


def _set_train_mode(model: nn.Module, batchnorm: str) -> None:
    tree.set_training_(model, True)
    if batchnorm == "frozen":
        for module in tree.modules(model):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.training = False


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    settings: FineTune,
    train,
    holdout,
    example_input: torch.Tensor,
    *,
    rewritten: list[str],
    device: str | torch.device | None = None,
    progress: bool | None = None,
    task: Task | None = None,
) -> dict:
    """Fine-tune ``student`` in place by distillation from ``teacher`` and return the report record.

    ``train``/``holdout``: a :class:`~compressor.data.Dataset`, tensors or ``(inputs, labels)``
    batches. ``rewritten``: the qualified names of the rewritten convs (a stack in ``student``, the
    original ``nn.Conv2d`` in ``teacher``), for the feature term. ``teacher`` is not modified (a
    frozen copy is used). ``progress``: show the bar (default: when stderr is a terminal, rank 0 only).
    ``task``: what the outputs are (:mod:`compressor.task`); ``None`` detects it from the teacher.
    The student ends on ``example_input``'s device in eval mode, with the best held-out weights seen.
    """
    started = time.perf_counter()
    rank, world = _distributed()
    device = resolve_device(device)
    home = example_input.device
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and rank == 0

    train_samples = samples_of(train, example_input, "fine-tuning data")
    held_out = samples_of(holdout, example_input, "held-out data")
    augment = settings.augment if settings.augment is not None else example_input.shape[1] in (1, 3)
    augment = augment and example_input.dim() == 4

    torch.manual_seed(settings.seed)
    # channels_last: oneDNN's CPU convolutions train ~30% faster in it (ResNet-32 factor stacks, 1 thread).
    memory_format = torch.channels_last if device.type == "cpu" and example_input.dim() == 4 else None
    teacher = tree.requires_grad_(tree.set_training_(tree.move_(copy.deepcopy(teacher), device, memory_format=memory_format), False), False)
    tree.move_(student, device, memory_format=memory_format)
    if task is None:
        task = task_of(teacher, example_input.to(device), None)
    capture = _Capture(student, teacher, rewritten) if settings.feature_weight > 0 and rewritten else None
    model = student
    if world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    generator = torch.Generator().manual_seed(settings.seed + 1000 * rank)
    sampler = DistributedSampler(range(train_samples.count), num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    batch_size = min(settings.batch_size, len(sampler))
    # A partial last batch is dropped: it would weigh its few samples as much as a full batch.
    steps_per_epoch = max(len(sampler) // batch_size, 1)
    budget = _Budget(settings, steps_per_epoch)
    optimizer = _optimizer(student, settings)
    peak = settings.learning_rate

    evaluator = _HeldOut(held_out, teacher, device, max(settings.batch_size, 128), rank, world, task)
    eval_started = time.perf_counter()
    before = evaluator.measure(student, world)
    eval_seconds = time.perf_counter() - eval_started
    best, best_step = before, 0
    best_state = tree.snapshot(student)
    # "seconds" since the fine-tune began: the curve of held-out accuracy against time spent.
    history = [{"step": 0, "seconds": time.perf_counter() - started, **before}]

    losses: list[float] = []
    step = epoch = 0
    train_seconds = 0.0
    images = 0
    reason = None
    next_eval = 1 / settings.evaluations
    bar = _Bar(progress)
    try:
        with _Interrupt() as interrupt:
            while reason is None:
                sampler.set_epoch(epoch)
                order = np.fromiter(iter(sampler), dtype=np.int64)
                for first in range(0, steps_per_epoch * batch_size, batch_size):
                    step_started = time.perf_counter()
                    inputs, labels = train_samples.take(order[first : first + batch_size])
                    if augment:
                        inputs = _augment(inputs, generator)
                    inputs = inputs.to(device, non_blocking=True)
                    if memory_format is not None:
                        inputs = inputs.contiguous(memory_format=memory_format)
                    progress_now = budget.progress(step, time.perf_counter() - started)
                    for group in optimizer.param_groups:
                        group["lr"] = _learning_rate(peak, settings.warmup, progress_now)
                    _set_train_mode(student, settings.batchnorm)
                    if capture is not None:
                        capture.active = True
                    with torch.no_grad():
                        reference = flatten_outputs(teacher(inputs))
                    output = flatten_outputs(model(inputs))
                    if capture is not None:
                        capture.active = False
                    if labels is not None and task.logits:
                        labels = check_labels(task, labels.to(device), output[0], "fine-tuning data", training=True)
                    else:
                        labels = None  # outputs without classes have no labels to learn from
                    loss = output_loss(output, reference, labels, task, settings.temperature, settings.alpha)
                    if capture is not None:
                        loss = loss + settings.feature_weight * _feature_loss(capture.pairs())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    images += inputs.shape[0] * world
                    train_seconds += time.perf_counter() - step_started

                    # One all-reduce carries the mean loss and rank 0's decisions, so all ranks agree.
                    elapsed = time.perf_counter() - started
                    # The slower of the mean and the last step: steps slow down when the machine gets busy.
                    step_seconds = max(train_seconds / step, time.perf_counter() - step_started)
                    stop = budget.stop_reason(step, elapsed, step_seconds, eval_seconds * 1.2)
                    progress_now = budget.progress(step, elapsed)
                    # A periodic evaluation must leave room for the final one too.
                    evaluate_now = (
                        progress_now >= next_eval
                        and stop is None
                        and budget.stop_reason(step, elapsed + eval_seconds * 1.2, step_seconds, eval_seconds * 1.2) is None
                    )
                    codes = {"steps": 1, "epochs": 2, "max_minutes": 3}
                    sync = torch.tensor(
                        [float(loss.detach()), codes.get(stop, 0) if rank == 0 else 0, float(evaluate_now and rank == 0),
                         float(interrupt.requested)],
                        dtype=torch.float64,
                        device=device,
                    )
                    if world > 1:
                        dist.all_reduce(sync)
                    mean_loss = float(sync[0]) / world
                    if not math.isfinite(mean_loss):
                        raise CompressorError(
                            f"fine-tuning diverged at step {step} (loss {mean_loss}); lower finetune.lr "
                            f"(now {peak:g})"
                        )
                    losses.append(mean_loss)
                    if sync[3] > 0:
                        reason = "interrupted"
                    elif sync[1] > 0:
                        reason = {1: "steps", 2: "epochs", 3: "max_minutes"}[int(sync[1])]
                    bar.update(
                        progress_now, step=step, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                        ips=images / max(train_seconds, 1e-9), eta=_eta(progress_now, elapsed),
                    )
                    if sync[2] > 0:
                        while next_eval <= progress_now:
                            next_eval += 1 / settings.evaluations
                        measured = evaluator.measure(student, world)
                        history.append({"step": step, "seconds": time.perf_counter() - started, **measured})
                        if _score(measured) > _score(best):
                            best, best_step = measured, step
                            best_state = tree.snapshot(student)
                    if reason is not None:
                        break
                epoch += 1
            # Half-applied or not, an interrupted step's weights were never measured: only a finished run's are.
            if reason != "interrupted" and history[-1]["step"] != step:
                measured = evaluator.measure(student, world)
                history.append({"step": step, "seconds": time.perf_counter() - started, **measured})
                if _score(measured) > _score(best):
                    best, best_step = measured, step
                    best_state = tree.snapshot(student)
    finally:
        bar.close()
        if capture is not None:
            capture.remove()
    tree.restore_(student, best_state)
    tree.set_training_(tree.move_(student, home, memory_format=torch.contiguous_format if memory_format else None), False)
    record = {
        "task": task.kind,
        "device": str(device),
        "world_size": world,
        "stopped_by": reason,
        "interrupted": reason == "interrupted",
        "budget": {"steps": settings.steps, "epochs": settings.epochs, "max_minutes": settings.max_minutes},
        "steps": step,
        "epochs": step / steps_per_epoch,
        "batch_size": batch_size,
        "train_samples": train_samples.count,
        "holdout_samples": held_out.count,
        "optimizer": settings.optimizer,
        "lr": peak,
        "augment": bool(augment),
        "batchnorm": settings.batchnorm,
        "feature_layers": len(rewritten) if capture is not None else 0,
        "images_per_second": images / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "loss": _curve(losses),
        "before": before,
        "after": best,
        "best_step": best_step,
        "evaluations": history,
    }
    if world > 1:
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, state_digest(student))
        record["distributed"] = {
            "backend": dist.get_backend(),
            "rank_digests": digests,
            "identical": len(set(digests)) == 1,
        }
    record["seconds"] = time.perf_counter() - started
    return record
