"""Benchmark every backbone option: forward and forward+backward time and peak memory.

    python scripts/bench_backbones.py                           # CPU, 1 thread, 512x512, batch 1
    python scripts/bench_backbones.py --batches 1 8 --backbones segformer_b0 resnet50
    python scripts/bench_backbones.py --device cuda             # GPU, bf16 autocast

Each (backbone, batch) runs in a fresh subprocess so that peak memory is its own: on CPU the
growth of peak resident memory over the weights and inputs (so the fwd+bwd figure is the peak of
both steps), on GPU ``torch.cuda.max_memory_allocated``. Times are medians
over --repeats after one warm-up. For the MiT sizes the script also times Hugging Face's
``SegformerModel`` of the same size (when ``transformers`` is installed) and prints the ratio
reference / zeroseg, the straightforward implementation being the reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from importlib.resources import files

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(name: str, implementation: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    if implementation == "huggingface":
        import transformers

        from zeroseg.models.mit import MIT_SIZES

        depths, dims = MIT_SIZES[name.removeprefix("segformer_")]
        config = transformers.SegformerConfig(depths=list(depths), hidden_sizes=list(dims), drop_path_rate=0.1)
        model = transformers.SegformerModel(config)
        return _HuggingFaceStages(model)
    import hydra

    cfg = OmegaConf.load(str(files("zeroseg") / "conf" / "backbone" / f"{name}.yaml"))
    return hydra.utils.instantiate(cfg)


class _HuggingFaceStages(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values=images, output_hidden_states=True).hidden_states)


def worker(name: str, implementation: str, batch: int, size: int, device: str, repeats: int) -> dict:
    torch.set_num_threads(1)
    model = _build(name, implementation).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(images)

    def forward_backward() -> None:
        with autocast:
            loss = sum(f.float().mean() for f in model(images))
        loss.backward()
        model.zero_grad(set_to_none=True)

    results = {}
    # peak RSS only grows: measure growth over the weights and inputs, forward before fwd+bwd
    rss_baseline = _peak_rss_mb()
    for label, step in (("forward", forward), ("forward_backward", forward_backward)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb() - rss_baseline
        results[label] = {"seconds": statistics.median(times), "peak_mb": peak}
    return {"backbone": name, "implementation": implementation, "batch": batch, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options = sorted(p.name[:-5] for p in files("zeroseg").joinpath("conf", "backbone").iterdir() if p.name.endswith(".yaml"))
    parser.add_argument("--backbones", nargs="*", default=options)
    parser.add_argument("--batches", nargs="*", type=int, default=[1])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the Hugging Face SegFormer comparison")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "IMPLEMENTATION", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, implementation, batch = args.worker
        print(json.dumps(worker(name, implementation, int(batch), args.size, args.device, args.repeats)))
        return
    try:
        import transformers  # noqa: F401

        have_reference = not args.no_reference
    except ImportError:
        have_reference = False
    print(f"device={args.device} size={args.size}x{args.size} threads=1 repeats={args.repeats} (median seconds, peak MB)")
    print(
        f"{'backbone':14s} {'batch':>5s} {'fwd s':>8s} {'fwd MB':>8s} {'fwd+bwd s':>10s} {'fwd+bwd MB':>10s}  reference/zeroseg"
    )
    for name in args.backbones:
        for batch in args.batches:
            rows = {}
            implementations = ["zeroseg"] + (["huggingface"] if have_reference and name.startswith("segformer_") else [])
            for implementation in implementations:
                command = [sys.executable, __file__, "--worker", name, implementation, str(batch), "--size", str(args.size),
                           "--device", args.device, "--repeats", str(args.repeats)]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:  # e.g. killed for memory: report and go on
                    print(f"{name:14s} {batch:5d} {implementation} failed: {result.stderr.strip()[-200:]}", flush=True)
                    continue
                rows[implementation] = json.loads(result.stdout.strip().splitlines()[-1])
            if "zeroseg" not in rows:
                continue
            ours = rows["zeroseg"]
            ratio = ""
            if "huggingface" in rows:
                reference = rows["huggingface"]
                ratio = (
                    f"fwd {reference['forward']['seconds'] / ours['forward']['seconds']:.2f}x, "
                    f"fwd+bwd {reference['forward_backward']['seconds'] / ours['forward_backward']['seconds']:.2f}x"
                )
            print(
                f"{name:14s} {batch:5d} {ours['forward']['seconds']:8.3f} {ours['forward']['peak_mb']:8.0f} "
                f"{ours['forward_backward']['seconds']:10.3f} {ours['forward_backward']['peak_mb']:10.0f}  {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
