"""Precision and CPU speed: fp32 against bf16 autocast, and what a cold run costs.

Prints one report of three parts:

1. **speed** -- for EfficientNet-Lite0 (channels_last, as ptcl runs CNNs, and plain NCHW to
   show what channels_last buys) and the DINOv2 ViT-S/14 (``dinov2_vits14_imgfocus``) at 112 and
   224 px: images/s of the backbone forward (``torch.inference_mode``, batch ``--batch``) in fp32
   and in bf16 autocast, the FLOPs of one image (``torch.utils.flop_counter.FlopCounterMode``
   on one fp32 forward: 2 FLOPs per multiply-add of every matmul, convolution and attention),
   the achieved GFLOP/s and its fraction of this CPU's peak (:func:`cpu_peak`, whose inputs are
   printed). Every configuration is timed ``--reps`` times, the configurations interleaved
   (A B C A B C ...), so machine load hits all alike; the table gives medians.
2. **accuracy** -- simplecil and ranpac (tuning=none) on the README's CIFAR-10 setting
   (``dinov2_vits14_imgfocus`` at 112 px, 200 train / 100 test images per class, init 4,
   increment 2, seed 1993) in fp32 and bf16 (``precision=bf16``: bf16 features, float32
   heads), with the difference bf16 - fp32 in points. bf16 is recommended for a backbone only
   where every difference stays within ``--tolerance`` (0.3) points.
3. **cold** -- a cold run of simplecil (empty feature cache, through ``ptcl.engine.runner.run``)
   against one plain forward pass of the backbone over the same train+test images (already
   decoded and transformed in memory, batch ``eval_batch_size``), interleaved A B A B A B;
   the ratio of the medians must be <= 1.2. The archive is extracted (and the DINOv2 weights
   converted) once before, outside the timings.

    python benchmarks/bench_precision.py [--parts speed accuracy cold] [--reps 3] \\
        [--archive ../shared/data/cifar10-jpg.tar.gz] [--acc-backbone dinov2_vits14_imgfocus@112]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPEED_MODELS = ("efficientnet_lite0", "dinov2_vits14_imgfocus")
SIZES = (112, 224)


# --------------------------------------------------------------------------- the CPU's peak


@dataclass
class Peak:
    """Peak FLOP/s of this CPU: ``cores x clock x FLOPs/cycle/core`` per precision."""

    model: str
    vendor: str
    family: int
    cores: int
    mhz: float
    isa: str
    fp32_per_cycle: int
    bf16_per_cycle: int
    why: str

    def gflops(self, precision: str) -> float:
        per_cycle = self.fp32_per_cycle if precision == "fp32" else self.bf16_per_cycle
        return self.cores * self.mhz * 1e-3 * per_cycle


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo``."""
    out: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def cpu_peak(threads: int) -> Peak:
    """Peak of ``threads`` cores from ``/proc/cpuinfo`` (model, vendor, family, ``cpu MHz``,
    flags).

    FLOPs/cycle/core, fp32: two FMA pipes x vector lanes x 2 (multiply + add): AVX-512 16
    lanes -> 64, AVX2+FMA 8 lanes -> 32. AMD Zen 4 (family 25 with AVX-512) runs each 512-bit
    instruction as two 256-bit halves on 256-bit pipes, so 32, not 64. bf16: AVX512_BF16's
    ``vdpbf16ps`` does two multiply-adds per fp32 lane, so twice the fp32 figure (same pipes);
    with AMX-BF16 (Intel Sapphire Rapids and later) a core's tile unit does 1024 bf16
    FLOPs/cycle. The clock is the ``cpu MHz`` the kernel reports (the base clock under a
    hypervisor; boost clocks make the true peak higher, the fractions lower).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", "?"), int(info.get("cpu family", "0") or 0)
    mhz = float(info.get("cpu MHz", "0") or 0)
    if "avx512f" in flags:
        halves = vendor == "AuthenticAMD" and family == 25  # Zen 4: 512-bit ops double-pumped
        fp32, isa = (32, "AVX-512 on 256-bit pipes (Zen 4)") if halves else (64, "AVX-512, 2 FMA pipes")
    elif {"avx2", "fma"} <= flags:
        fp32, isa = 32, "AVX2+FMA, 2 FMA pipes"
    else:
        fp32, isa = 8, "SSE"
    if "amx_bf16" in flags:
        bf16, why = 1024, "AMX-BF16 tile unit: 1024 bf16 FLOP/cycle/core"
    elif "avx512_bf16" in flags:
        bf16, why = 2 * fp32, "AVX512_BF16 vdpbf16ps: 2 multiply-adds per fp32 lane -> 2 x fp32"
    else:
        bf16, why = fp32, "no bf16 instructions: bf16 runs at fp32 speed at best"
    return Peak(info.get("model name", "?"), vendor, family, threads, mhz, isa, fp32, bf16, why)


# --------------------------------------------------------------------------- speed


def build(name: str, size: int):
    from ptcl.backbones import build_backbone
    from ptcl.config import BackboneConfig

    return build_backbone(BackboneConfig(name=name, image_size=size)).eval()


def flops_per_image(forward, size: int) -> float:
    """FLOPs of one fp32 forward of one ``size`` x ``size`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        forward(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def timed(forward, x: torch.Tensor, precision: str, iters: int) -> float:
    """Images/s of ``iters`` forwards of batch ``x`` (after one warm-up forward)."""
    from ptcl.precision import autocast

    with torch.inference_mode(), autocast("cpu", precision):
        forward(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            forward(x)
        dt = time.perf_counter() - t0
    return iters * len(x) / dt


def speed_rows(args, peak: Peak) -> list[dict]:
    configs = []  # (model, layout, size, forward)
    for name in SPEED_MODELS:
        for size in SIZES:
            bb = build(name, size)
            configs.append((name, "channels_last" if bb.kind == "cnn" else "-", size, bb))
            if bb.kind == "cnn":  # the same weights in NCHW, to show what channels_last buys
                nchw = copy.deepcopy(bb.model).to(memory_format=torch.contiguous_format)
                configs.append((name, "NCHW", size, nchw))
    flops = {(c[0], c[2]): flops_per_image(c[3], c[2]) for c in configs if c[1] != "NCHW"}
    xs = {s: torch.randn(args.batch, 3, s, s) for s in SIZES}
    times: dict[tuple, list[float]] = {}
    for _ in range(args.reps):  # interleaved: every configuration once per round
        for name, layout, size, fwd in configs:
            for precision in ("fp32", "bf16"):
                ips = timed(fwd, xs[size], precision, args.iters)
                times.setdefault((name, layout, size, precision), []).append(ips)
    rows = []
    for name, layout, size, _ in configs:
        f = flops[(name, size)]
        row = {"model": name, "layout": layout, "size": size, "gflop_per_img": f / 1e9}
        for p in ("fp32", "bf16"):
            ips = statistics.median(times[(name, layout, size, p)])
            row[p] = ips
            row[f"{p}_gflops"] = ips * f / 1e9
            row[f"{p}_peak"] = row[f"{p}_gflops"] / peak.gflops(p)
        rows.append(row)
    return rows


def print_speed(rows: list[dict], peak: Peak, args) -> None:
    print(f"CPU: {peak.model} ({peak.vendor}, family {peak.family}); {peak.cores} cores used x "  # noqa: T201
          f"{peak.mhz:.0f} MHz; {peak.isa}: fp32 {peak.fp32_per_cycle} FLOP/cycle/core; "
          f"bf16 {peak.bf16_per_cycle} ({peak.why})")
    print(f"peak = cores x clock x FLOP/cycle: fp32 {peak.gflops('fp32'):.0f} GFLOP/s, "  # noqa: T201
          f"bf16 {peak.gflops('bf16'):.0f} GFLOP/s; torch threads {torch.get_num_threads()}; batch {args.batch}, "
          f"{args.iters} forwards per timing, median of {args.reps} interleaved rounds")
    head = (f"{'backbone':<24} {'layout':<13} {'px':>4} {'GFLOP/img':>9} {'fp32 img/s':>10} {'bf16 img/s':>10} "
            f"{'bf16/fp32':>9} {'fp32 GFLOP/s':>12} {'%peak':>6} {'bf16 GFLOP/s':>12} {'%peak':>6}")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        print(f"{r['model']:<24} {r['layout']:<13} {r['size']:>4} {r['gflop_per_img']:9.3f} {r['fp32']:10.1f} "  # noqa: T201
              f"{r['bf16']:10.1f} {r['bf16'] / r['fp32']:9.2f} {r['fp32_gflops']:12.1f} {100 * r['fp32_peak']:5.1f}% "
              f"{r['bf16_gflops']:12.1f} {100 * r['bf16_peak']:5.1f}%")


# --------------------------------------------------------------------------- accuracy


def setting(args, backbone: str, size: int) -> list[str]:
    return [
        f"backbone.name={backbone}", f"backbone.image_size={size}", "dataset.name=imagefolder",
        f"dataset.root={args.archive}", f"dataset.train_per_class={args.train_per_class}",
        f"dataset.test_per_class={args.test_per_class}", f"scenario.init_cls={args.init_cls}",
        f"scenario.increment={args.increment}", "seed=1993",
    ]


def accuracy_rows(args) -> list[dict]:
    from ptcl.data.features import FeatureCache
    from ptcl.engine.runner import run

    rows = []
    for spec in args.acc_backbone:
        name, _, size = spec.partition("@")
        base = setting(args, name, int(size))
        res = {}
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as tmp:
                cache = FeatureCache(Path(tmp) / "features")  # simplecil fills it, ranpac reads it
                for method in ("simplecil", "ranpac:tuning=none"):
                    mname, *opts = method.split(":")
                    over = [f"method.name={mname}", *(f"method.{o}" for o in opts), *base, f"precision={precision}"]
                    m = run(None, over, out=Path(tmp) / mname, quiet=True, cache=cache)
                    res[(method, precision)] = m
        for method in ("simplecil", "ranpac:tuning=none"):
            a, b = res[(method, "fp32")], res[(method, "bf16")]
            rows.append({
                "backbone": spec, "method": method,
                "fp32": (a["avg_acc"], a["last_acc"]), "bf16": (b["avg_acc"], b["last_acc"]),
                "d_avg": b["avg_acc"] - a["avg_acc"], "d_last": b["last_acc"] - a["last_acc"],
                "feat_s": (a["feature_time_s"], b["feature_time_s"]),
            })
    return rows


def print_accuracy(rows: list[dict], args) -> None:
    print(f"\naccuracy (CIFAR-10 archive, {args.train_per_class}/{args.test_per_class} per class, "  # noqa: T201
          f"init {args.init_cls} + {args.increment}, seed 1993; feature pass = the cold extraction's seconds)")
    head = (f"{'backbone':<28} {'method':<20} {'fp32 avg/last':>14} {'bf16 avg/last':>14} {'d avg':>6} "
            f"{'d last':>6} {'feature pass fp32/bf16 s':>25}")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        print(f"{r['backbone']:<28} {r['method']:<20} {r['fp32'][0]:6.2f}/{r['fp32'][1]:6.2f} "  # noqa: T201
              f"{r['bf16'][0]:6.2f}/{r['bf16'][1]:6.2f} {r['d_avg']:+6.2f} {r['d_last']:+6.2f} "
              f"{r['feat_s'][0]:12.1f}/{r['feat_s'][1]:.1f}")
    for spec in dict.fromkeys(r["backbone"] for r in rows):
        # accuracies are percentages with 2 decimals: compare their difference at that precision
        worst = round(max(max(abs(r["d_avg"]), abs(r["d_last"])) for r in rows if r["backbone"] == spec), 2)
        verdict = "recommend bf16" if worst <= args.tolerance else "keep fp32"
        print(f"{spec}: largest |bf16 - fp32| = {worst:.2f} points -> {verdict} (tolerance {args.tolerance})")  # noqa: T201


# --------------------------------------------------------------------------- cold run


def cold_rows(args) -> dict:
    from ptcl.backbones import build_backbone
    from ptcl.config import build_config
    from ptcl.data.datasets import load_dataset
    from ptcl.data.features import FeatureCache
    from ptcl.engine.runner import run

    name, _, size = args.cold_backbone.partition("@")
    over = ["method.name=simplecil", *setting(args, name, int(size))]
    cfg = build_config(None, over)
    t0 = time.perf_counter()
    splits = load_dataset(cfg.dataset)  # the one-off archive extraction, outside the timings
    bb = build_backbone(cfg.backbone)  # (and the one-off weight conversion)
    one_off = time.perf_counter() - t0
    from ptcl.data.scenario import subset_per_class

    tf = bb.transform(train=False)
    xs = []
    for split, n in (("train", cfg.dataset.train_per_class), ("test", cfg.dataset.test_per_class)):
        s = getattr(splits, split)
        xs += [tf(s.load(int(i))) for i in subset_per_class(s.targets, n, cfg.dataset.subset_seed)]
    x = torch.stack(xs)  # float, normalised: the eval transform's float form

    def plain() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            for i in range(0, len(x), cfg.eval_batch_size):
                bb(x[i : i + cfg.eval_batch_size])
            return time.perf_counter() - t

    def cold(k: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            run(None, over, out=Path(tmp) / f"run{k}", quiet=True, cache=FeatureCache(Path(tmp) / "features"))
            return time.perf_counter() - t

    with torch.inference_mode():
        bb(x[: cfg.eval_batch_size])  # warm-up
    a, b = [], []
    for k in range(args.cold_reps):  # A B A B A B
        a.append(cold(k))
        b.append(plain())
    return {"backbone": args.cold_backbone, "images": len(x), "one_off": one_off, "cold": a, "plain": b}


def print_cold(r: dict, args) -> None:
    ratio = statistics.median(r["cold"]) / statistics.median(r["plain"])
    print(f"\ncold run of simplecil (empty feature cache) vs one plain forward over the same {r['images']} "  # noqa: T201
          f"images ({r['backbone']}), interleaved A B x {args.cold_reps}; one-off archive extraction + "
          f"weights before: {r['one_off']:.1f} s")
    print(f"{'measure':<34} {'each (s)':<28} {'median (s)':>10}")  # noqa: T201
    print(f"{'A: cold run (ptcl run)':<34} {' '.join(f'{v:.1f}' for v in r['cold']):<28} "  # noqa: T201
          f"{statistics.median(r['cold']):10.1f}")
    print(f"{'B: plain forward (decoded in RAM)':<34} {' '.join(f'{v:.1f}' for v in r['plain']):<28} "  # noqa: T201
          f"{statistics.median(r['plain']):10.1f}")
    print(f"ratio A / B (medians) = {ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")  # noqa: T201


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["speed", "accuracy", "cold"], choices=["speed", "accuracy", "cold"])
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds of the speed timings")
    ap.add_argument("--iters", type=int, default=2, help="forwards per speed timing")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--init-cls", type=int, default=4)
    ap.add_argument("--increment", type=int, default=2)
    ap.add_argument("--acc-backbone", nargs="*", default=["dinov2_vits14_imgfocus@112"], help="NAME@PX")
    ap.add_argument("--tolerance", type=float, default=0.3, help="accuracy points bf16 may differ by")
    ap.add_argument("--cold-backbone", default="dinov2_vits14_imgfocus@112", help="NAME@PX")
    ap.add_argument("--cold-reps", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    peak = cpu_peak(torch.get_num_threads())
    if "speed" in args.parts:
        print_speed(speed_rows(args, peak), peak, args)
    if "accuracy" in args.parts:
        print_accuracy(accuracy_rows(args), args)
    if "cold" in args.parts:
        print_cold(cold_rows(args), args)


if __name__ == "__main__":
    main()
