"""``python -m zeroseg.benchmark cost [key=value ...]``: what every method costs at its paper's sizes.

For each row of ``conf/benchmark/cost.yaml`` (a method under its paper recipe: real architectures with
random weights — SegFormer-B4/B0, ResNet-101(c), a ViT-B/16 teacher — at 512², 100 queries where the
method has them) one fresh process builds the model from the composed config and measures:

* **parameters**: trainable, frozen, and stored in a checkpoint (the teacher is never stored);
* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``, machine-independent) of one training step
  (forward + backward of ``training_losses``) and of inference (``segment``: the recipe's whole/slide
  mode), per image; the forward split by where it runs: the teacher, the backbone, the method's other
  modules (heads, decoders, CSH, latent branch) and everything outside modules (matching, losses,
  pseudo masks, the semantic inference's sums), the backward as one figure — with the teacher's share
  of the step (teacher FLOPs over the step's forward + backward);
* **CPU time** of a training step (batch ``train_batch``) and of inference (one image), one thread,
  median of ``repeats`` after one warm-up, and the process's **peak memory** (max RSS) after the step;
* **GPU** time and peak memory of a bf16 training step at batch ``gpu_batch`` only when ``device=cuda``
  and a GPU is present; otherwise the columns stay empty (never estimated).

FLOP counts follow ``FlopCounterMode``: a multiply-add counts 2; matmuls, convolutions and attention are
counted, element-wise ops (norms, activations, softmax) are not. Labels of the synthetic batch are
random rectangles of seen classes with unseen pixels as ignore (~10 regions per image), so methods that
work per region (C2S's region CLS tokens, pseudo masks) do the work a real image asks of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

log = logging.getLogger(__name__)

__all__ = [
    "PartFlopCounter",
    "conv_backward_flops",
    "flop_counter",
    "format_markdown",
    "measure_row",
    "run_cost_benchmark",
    "synthetic_batch",
    "write_cost_tables",
]

PARTS = ("teacher", "backbone", "modules", "outside")


def synthetic_batch(num_seen: int, batch: int, size: int, ignore_index: int = 255, regions: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """Images in ``[0, 1]`` and training labels: ``regions`` random rectangles of seen classes (training ids
    ``0..num_seen-1``) over an unseen (ignore) background, per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    labels = torch.full((batch, size, size), ignore_index, dtype=torch.long)
    for b in range(batch):
        for _ in range(regions):
            y0, x0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 8, size // 3, (2,), generator=generator).tolist()
            labels[b, y0 : y0 + h, x0 : x0 + w] = int(torch.randint(0, num_seen, (1,), generator=generator))
    return {"image": images, "label": labels}


class _Entry(nn.Module):
    """Calls one of the method's functions through a module, so the FLOP counter names every submodule
    by its path in the method (``Entry.method.teacher``...), even for functions other than ``forward``."""

    def __init__(self, method: nn.Module, function: str) -> None:
        super().__init__()
        self.method, self.function = method, function

    def forward(self, *args: Any) -> Any:
        return getattr(self.method, self.function)(*args)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:  # noqa: E501
    """FLOPs of ``aten.convolution_backward``: each requested gradient (input, weight) costs what the forward
    convolution costs. torch's own formula computes the weight gradient as an ungrouped convolution, so it
    counts a depthwise convolution's backward ``groups`` times over (×64 for a 64-channel depthwise 3×3,
    MiT's Mix-FFN); the forward count takes the groups from the weight's shape."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


class PartFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also files every counted operation under ONE part (:data:`PARTS`) of an
    :class:`_Entry` call, by the method's top-level children active when it runs: ``teacher`` if the teacher
    is among them (a text tower called by a prompt learner is still the teacher's), else ``backbone``, else
    ``modules`` (any other child: heads, decoders, prompts), else ``outside``. The per-module table of
    ``FlopCounterMode`` adds an operation to every active module, so nested children would count twice."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
        self.part_counts = dict.fromkeys(PARTS, 0)

    def _count_flops(self, func_packet, out, args, kwargs):  # type: ignore[override]
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            children = {name.split(".")[2] for name in self.mod_tracker.parents if name.startswith("_Entry.method.")}
            part = next((p for p in ("teacher", "backbone") if p in children), "modules" if children else "outside")
            self.part_counts[part] += flops
            for parent in set(self.mod_tracker.parents):
                self.flop_counts[parent][func_packet] += flops
        return out


def flop_counter() -> PartFlopCounter:
    """A FLOP counter with the grouped-convolution backward counted correctly (:func:`conv_backward_flops`)
    and the split by part (:class:`PartFlopCounter`)."""
    return PartFlopCounter()


def _count_flops(method: nn.Module, function: str, *args: Any, backward: bool = False) -> dict[str, int]:
    """Forward FLOPs split by :data:`PARTS` and, with ``backward``, the backward pass's FLOPs as one figure
    (``FlopCounterMode`` attributes backward ops to modules unreliably — a backbone's weight gradients land in
    the head that consumed its features — while the forward split is exact; the frozen teacher runs without
    gradients, so its share of the step is its forward FLOPs over the step's total)."""
    entry = _Entry(method, function)
    with flop_counter() as counter:
        out = entry(*args)
    split = {**counter.part_counts, "total": counter.get_total_flops()}
    split["backward"] = 0
    if backward:
        with flop_counter() as counter:
            out["loss"].backward()
        split["backward"] = counter.get_total_flops()
        split["total"] += split["backward"]
    method.zero_grad(set_to_none=True)
    return split


def _median_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_stage1_checkpoint(overrides: Sequence[str], path: Path) -> Path:
    """A checkpoint of the first-stage model that ``overrides`` compose (random weights), written as a
    training run writes it, so a two-stage method's cost row loads real-sized frozen proposals."""
    from zeroseg.build import build_model
    from zeroseg.utils import compose_config

    with tempfile.TemporaryDirectory() as run_dir:
        _, _, model = build_model(compose_config("train", list(overrides), run_dir, root_dir=run_dir))
    checkpoint: dict[str, Any] = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def measure_row(
    overrides: Sequence[str],
    train_batch: int,
    image_size: int,
    repeats: int,
    device: str,
    gpu_batch: int,
    stage1_overrides: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every measure of one configuration (see the module docstring), in this process. ``stage1_overrides``:
    the first stage of a two-stage method, given to it as ``method.proposals.ckpt_path`` (random weights)."""
    from zeroseg.build import build_model
    from zeroseg.utils import compose_config

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = list(overrides)
        if stage1_overrides:
            stage1 = random_stage1_checkpoint(stage1_overrides, Path(run_dir) / "stage1" / "checkpoints" / "last.ckpt")
            overrides.append(f"method.proposals.ckpt_path={stage1}")
        # the run's caches (text embeddings) stay in the temporary directory: nothing is read from data folders
        cfg = compose_config("train", overrides, run_dir, root_dir=run_dir)
        datamodule, teacher, model = build_model(cfg)
    split, setting = datamodule.split, datamodule.setting
    num_seen = len(split.train_class_names(setting))
    parameters = list(model.parameters())
    stored = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    result: dict[str, Any] = {
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "frozen_params": sum(p.numel() for p in parameters if not p.requires_grad),
        "checkpoint_params": sum(v.numel() for v in stored.values()),
        "inference_mode": str(cfg.get("inference", {}).get("mode", "whole")) if cfg.get("inference") else "whole",
    }
    batch = synthetic_batch(num_seen, train_batch, image_size, split.ignore_index)
    image = batch["image"][:1]
    result["train_flops_per_image"] = result["teacher_share"] = None
    if model.trainable:  # training-free methods (clip_zero_shot, multipass_clip on given proposals) only infer
        model.train()
        step_flops = _count_flops(model, "training_losses", batch, backward=True)
        result["train_flops_per_image"] = {k: v / train_batch for k, v in step_flops.items()}
        result["teacher_share"] = step_flops["teacher"] / step_flops["total"] if step_flops["total"] else math.nan
    model.eval()
    # parameters switched to requires_grad=False while counting: the counter's module tracker hooks every module
    # input that requires gradients, and under no_grad a view of a parameter (query embeddings expanded over the
    # batch) still does, without a gradient function, which the tracker refuses
    flags = [p.requires_grad for p in parameters]
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            model.segment(image)  # one-time work (DeOP's learnt-context text embeddings) is not per image
            result["inference_flops_per_image"] = _count_flops(model, "segment", image)
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)

    def train_step() -> None:
        model.train()
        model.training_losses(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)

    def inference() -> None:
        model.eval()
        with torch.no_grad():
            model.segment(image)

    result["cpu_train_step_seconds"] = _median_seconds(train_step, repeats) if model.trainable else None
    result["cpu_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["cpu_inference_seconds"] = _median_seconds(inference, repeats)
    result["gpu_train_step_seconds"] = result["gpu_peak_memory_mb"] = None
    if device == "cuda" and torch.cuda.is_available() and model.trainable:
        model.cuda()
        gpu_batch_data = {k: v.cuda() for k, v in synthetic_batch(num_seen, gpu_batch, image_size, split.ignore_index).items()}

        def gpu_step() -> None:
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.training_losses(gpu_batch_data)["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        result["gpu_train_step_seconds"] = _median_seconds(gpu_step, repeats, torch.cuda.synchronize)
        result["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _worker(spec: dict[str, Any]) -> None:
    torch.set_num_threads(int(spec["threads"]))
    result = measure_row(
        spec["overrides"], spec["train_batch"], spec["image_size"], spec["repeats"], spec["device"], spec["gpu_batch"],
        spec.get("stage1_overrides"),
    )  # fmt: skip
    print("COST_RESULT " + json.dumps(result))


def run_cost_benchmark(bench: DictConfig) -> dict[str, Any]:
    """Measure every row in its own process (peak memory per row, no state shared between rows)."""
    rows = OmegaConf.to_container(bench.rows, resolve=True)
    selected = set(bench.only) if bench.get("only") else None
    results: dict[str, Any] = {"name": bench.name, "settings": {k: bench[k] for k in ("train_batch", "gpu_batch", "image_size", "repeats", "threads", "device")}, "rows": []}
    for row in rows:
        if selected is not None and row["row"] not in selected:
            continue
        spec = {
            "overrides": [*bench.overrides, *row["overrides"], *bench.run_overrides],
            "train_batch": bench.train_batch,
            "image_size": bench.image_size,
            "repeats": bench.repeats,
            "threads": bench.threads,
            "device": bench.device,
            "gpu_batch": bench.gpu_batch,
            "stage1_overrides": [*bench.overrides, *row["stage1"], *bench.run_overrides] if row.get("stage1") else None,
        }
        log.info("cost: %s (%s)", row["row"], " ".join(spec["overrides"]))
        started = time.perf_counter()
        process = subprocess.run(
            [sys.executable, "-m", "zeroseg.cost", "--worker", json.dumps(spec)], capture_output=True, text=True
        )
        lines = [line for line in process.stdout.splitlines() if line.startswith("COST_RESULT ")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"cost row {row['row']!r} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
        measured = json.loads(lines[-1][len("COST_RESULT ") :])
        log.info("cost: %s done in %.0f s", row["row"], time.perf_counter() - started)
        results["rows"].append({"row": row["row"], "overrides": row["overrides"], "note": row.get("note", ""), **measured})
    return results


def _g(flops: float) -> str:
    return f"{flops / 1e9:.1f}"


def _m(count: float) -> str:
    return f"{count / 1e6:.1f}"


def _optional(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"# {results['name']} benchmark",
        "",
        f"Random weights at the paper recipes' sizes; images {settings['image_size']}²; training step at batch "
        f"{settings['train_batch']}, inference one image; CPU times with {settings['threads']} thread(s), median of "
        f"{settings['repeats']} after a warm-up. GFLOPs per image (torch.utils.flop_counter; a multiply-add = 2). "
        "GPU columns are filled only on a GPU (bf16, batch "
        f"{settings['gpu_batch']}), never estimated.",
        "",
        "| method | params trainable / frozen / stored (M) | train GFLOPs (forward: teacher / backbone / modules / outside; backward) | teacher share | "
        "inference GFLOPs (teacher / backbone / modules / outside) | CPU train step (s) | CPU inference (s) | peak RSS (MB) | "
        "GPU step (s) | GPU memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        train, infer = row["train_flops_per_image"], row["inference_flops_per_image"]
        if train is None:  # training-free
            train_cells = "— | —"
        else:
            train_cells = (
                f"{_g(train['total'])} ({' / '.join(_g(train[p]) for p in PARTS)}; {_g(train['backward'])}) | "
                f"{100 * row['teacher_share']:.0f} %"
            )
        lines.append(
            f"| {row['row']} | {_m(row['trainable_params'])} / {_m(row['frozen_params'])} / {_m(row['checkpoint_params'])} | "
            f"{train_cells} | {_g(infer['total'])} ({' / '.join(_g(infer[p]) for p in PARTS)}) | "
            f"{_optional(row['cpu_train_step_seconds'], '.2f') or '—'} | "
            f"{row['cpu_inference_seconds']:.2f} | {row['cpu_peak_rss_mb']:.0f} | "
            f"{_optional(row['gpu_train_step_seconds'], '.3f')} | {_optional(row['gpu_peak_memory_mb'], '.0f')} |"
        )
    notes = [row for row in results["rows"] if row.get("note")]
    if notes:
        lines += ["", *[f"- {row['row']}: {row['note']}" for row in notes]]
    return "\n".join(lines) + "\n"


def write_cost_tables(results: dict[str, Any], output_dir: Path) -> None:
    """``cost.md`` and ``cost.json`` in ``output_dir``; the table is printed too."""
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(results)
    (output_dir / "cost.md").write_text(markdown)
    (output_dir / "cost.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown)
    log.info("cost: tables written to %s", output_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help="internal: measure one row given as JSON")
    args, _ = parser.parse_known_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return
    raise SystemExit("run the cost benchmark as: python -m zeroseg.benchmark cost [key=value ...]")


if __name__ == "__main__":
    main()
