"""Where one replayed unit's time goes: the replay's own model (planner/runtime; on a GPU bf16 autocast over fp32
parameters, as `meshplan replay --dtype bf16` runs it; on a CPU fp32 in one torch thread, as a CPU rank runs it) over
one packed bin, forward (with the loss) and backward timed, and every kernel of one more pass put in a class
(GEMM, attention, elementwise): CUDA kernels by their name from the torch profiler; on a CPU each aten operator timed
around its call (a dispatch mode: the CPU profiler slowed some GEMMs of the forward 3x); then the cost model's price of
the same unit per class on each profile given.

    python -m bench.kernel_breakdown --out bd.json                 # on a CUDA machine: the default cases
    python -m bench.kernel_breakdown --case l8b-32k:llama3-8b:4:32768 --out bd.json   # NAME:MODEL:LAYERS:DOCS
    python -m bench.kernel_breakdown --device cpu --profile local-cpu.measured      # this CPU: the tiny model's cases
    python -m bench.kernel_breakdown --from bench/data/h200-2026-12-04/breakdown.json \
        --profile h200-sxm.analytic --profile h200-sxm.measured   # anywhere: the comparison only

DOCS is one document length, or `packedN:MEDIAN` for N tokens of lognormal documents (sigma 1.2, seed 1). Figures,
never pass/fail; the cost model is priced with `--kernels eager` (the replay's op-by-op kernels), on a CPU profile for
one rank on its node (the whole core, as the profile timed its tables). The wall times are taken untimed per operator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

from costmodel.presets import load_model  # noqa: E402
from costmodel.specs import ModelSpec  # noqa: E402

# (name, model preset, layers kept, documents): a real layer shape (Llama-3-8B, 4 of its layers fit one GPU with
# fp32 parameters and AdamW) at 32K and 8K tokens and as a bin of short documents; the machine check's small model
DEFAULT_CASES = ("l8b-32k-1doc:llama3-8b:4:32768", "l8b-8k-1doc:llama3-8b:4:8192",
                 "l8b-16k-packed:llama3-8b:4:packed16384:600", "small-32k-1doc:machine-check-small:4:32768",
                 "small-16k-packed:machine-check-small:4:packed16384:600", "small-16k-1doc:machine-check-small:4:16384")
# The CPU cases: the `tiny` model the CPU fidelity plans run (bench.fidelity), one document and bins of short ones
CPU_CASES = ("tiny-300-1doc:tiny:2:300", "tiny-2048-1doc:tiny:2:2048", "tiny-3k-packed:tiny:2:packed3000:300",
             "tiny-3k-packed-short:tiny:2:packed3000:30")
WARMUP, ITERS = 3, 5
CLASSES = ("gemm", "attention", "elementwise")
_CPU_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}


def packed_docs(total: int, median: float, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(int(min(total - sum(out), max(1, rng.lognormal(np.log(median), 1.2)))))
    return out


def kernel_class(name: str) -> str:
    """A CUDA kernel's class by its name: cuDNN / flash attention, cuBLAS (nvjet, cutlass, xmma) GEMMs, the rest
    (PyTorch's elementwise, reduction, copy, cat and softmax kernels, memsets) elementwise."""
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")):
        return "gemm"
    return "elementwise"


def cpu_op_class(name: str) -> str:
    """An aten operator's class by its name (the overload packet's, e.g. "mm"): torch's CPU flash attention (forward
    and backward), the matrix products, any other operator elementwise (views and reshapes among them: they take
    microseconds)."""
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "gemm" if name in _CPU_GEMMS else "elementwise"


def _cpu_op_timer():
    """A dispatch mode that adds each aten operator's wall time to its class (`by`, seconds) and counts them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTimer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.by, self.ops = dict.fromkeys(CLASSES, 0.0), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            self.by[cpu_op_class(func.overloadpacket.__name__)] += time.perf_counter() - t0
            self.ops += 1
            return out

    return OpTimer()


def parse_case(text: str) -> tuple[str, ModelSpec, list[int]]:
    try:
        name, model, layers, docs, *rest = text.split(":")
        spec = _spec(model)
        spec = dataclasses.replace(spec, name=f"{spec.name}-{layers}l", layers=int(layers))
        lengths = packed_docs(int(docs[len("packed"):]), float(rest[0])) if docs.startswith("packed") else [int(docs)]
    except (ValueError, IndexError) as e:
        sys.exit(f"--case {text!r}: expected NAME:MODEL:LAYERS:LENGTH or NAME:MODEL:LAYERS:packedN:MEDIAN ({e})")
    return name, spec, lengths


def _spec(model: str) -> ModelSpec:
    if model == "machine-check-small":
        from planner.studies.machine_check import GPU_MODEL
        return ModelSpec.from_dict(GPU_MODEL)
    return load_model(model)


def measure(name: str, spec: ModelSpec, docs: list[int], device: str = "cuda") -> dict:
    """fwd (+ loss) and bwd wall medians over ITERS passes after WARMUP, and one profiled pass of each."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from planner.runtime.cp import PackedAttention
    from planner.runtime.model import ModelConfig, build_model

    dev = torch.device(device)
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # a CPU rank of the replay runs one torch thread

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    model = build_model(ModelConfig(spec, precision="bf16" if gpu else "fp32"), 0, dev)
    t = sum(docs)
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens, labels = (torch.randint(0, spec.vocab, (t,), device=dev, generator=gen) for _ in range(2))
    pos = torch.cat([torch.arange(d, device=dev) for d in docs])
    bounds = np.cumsum([0] + docs)
    attn = PackedAttention.__new__(PackedAttention)  # the replay's degree-1 attention over these documents
    attn.slices, attn._cu = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])], None

    def forward():
        return model.token_losses(model(tokens, pos, attn), labels).sum() / t

    fwd, bwd = [], []
    for i in range(WARMUP + ITERS):
        sync()
        t0 = time.perf_counter()
        loss = forward()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        if i >= WARMUP:
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        model.zero_grad(set_to_none=False)
    phases = {}
    for phase in ("fwd", "bwd"):
        loss = forward() if phase == "bwd" else None
        sync()
        if gpu:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                loss = forward() if phase == "fwd" else loss.backward()
                sync()
            by = dict.fromkeys(CLASSES, 0.0)
            kernels = 0
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    by[kernel_class(e.name)] += e.time_range.elapsed_us() / 1e6
                    kernels += 1
        else:
            with (timer := _cpu_op_timer()):  # the backward's operators run on this thread too (CPU autograd)
                loss = forward() if phase == "fwd" else loss.backward()
            by, kernels = timer.by, timer.ops
        model.zero_grad(set_to_none=False)
        phases[phase] = {"by_class_s": by, "kernels": kernels}
    where = torch.cuda.get_device_name(0) if gpu else f"cpu: {platform.processor() or platform.machine()}"
    return {"case": name, "spec": spec.to_dict(), "doc_lengths": docs, "tokens": t, "fwd_s": statistics.median(fwd),
            "bwd_s": statistics.median(bwd), "phases": phases, "device": where, "torch": torch.__version__}


def priced(rec: dict, profile: str) -> dict:
    """The cost model's unit (kernels eager, tp = pp = 1) for the record's documents on `profile`: bf16 on one GPU,
    fp32 on one rank of a CPU node (as `meshplan replay` runs each)."""
    from costmodel.timing import CostModel
    from costmodel.presets import load_cluster
    from costmodel.specs import Setup, TrainingSpec
    from profiles.table import load_profile

    spec = ModelSpec.from_dict(rec["spec"])
    prof = load_profile(profile)
    cpu = prof.fingerprint.device.startswith("cpu")
    cluster = load_cluster("local-cpu" if cpu else "hgx-h200").with_gpus(1)
    setup = Setup(spec, cluster, TrainingSpec(dtype="fp32" if cpu else "bf16", kernels="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = CostModel(setup, prof).unit_cost(rec["doc_lengths"])
    return {"attention": (c.attn_fwd_compute_s, c.attn_bwd_compute_s),
            "rest": (c.fwd_s - c.attn_fwd_compute_s, c.bwd_s - c.attn_bwd_compute_s), "wall": (c.fwd_s, c.bwd_s)}


def compare(records: list[dict], profiles: list[str]) -> None:
    print("Per unit, forward / backward, ms: priced by the cost model (kernels eager) / measured. attention: the "
          "attention kernels; rest: GEMM + elementwise kernels; wall: the pass (host gaps included).\n")
    label = "GPU busy" if records and not records[0].get("device", "").startswith("cpu") else "operators"
    for prof in profiles:
        print(f"#### {prof}\n")
        print("| case | docs | tokens | attention fwd | attention bwd | rest fwd | rest bwd | wall fwd | wall bwd |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in records:
            p = priced(r, prof)
            f, b = (r["phases"][d]["by_class_s"] for d in ("fwd", "bwd"))
            meas = {"attention": (f["attention"], b["attention"]),
                    "rest": (f["gemm"] + f["elementwise"], b["gemm"] + b["elementwise"]),
                    "wall": (r["fwd_s"], r["bwd_s"])}
            cells = [f"{p[k][i] * 1e3:.1f} / {meas[k][i] * 1e3:.1f}" for k in ("attention", "rest", "wall")
                     for i in (0, 1)]
            print(f"| {r['case']} | {len(r['doc_lengths'])} | {r['tokens']} | " + " | ".join(cells) + " |")
        print()
    print(f"| case | {label} / wall fwd | bwd | kernels fwd / bwd | elementwise ms fwd / bwd |")
    print("|---|---|---|---|---|")
    for r in records:
        busy = [sum(r["phases"][d]["by_class_s"].values()) for d in ("fwd", "bwd")]
        print(f"| {r['case']} | {busy[0] / r['fwd_s']:.0%} | {busy[1] / r['bwd_s']:.0%} | "
              f"{r['phases']['fwd']['kernels']} / {r['phases']['bwd']['kernels']} | "
              f"{r['phases']['fwd']['by_class_s']['elementwise'] * 1e3:.1f} / "
              f"{r['phases']['bwd']['by_class_s']['elementwise'] * 1e3:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", help="NAME:MODEL:LAYERS:LENGTH or NAME:MODEL:LAYERS:packedN:MEDIAN")
    ap.add_argument("--out", type=Path, help="write the measured records here (JSON)")
    ap.add_argument("--from", dest="src", type=Path, help="records measured before: compare only, no GPU needed")
    ap.add_argument("--profile", action="append", help="price on this profile (repeatable; default "
                                                       "h200-sxm.analytic and h200-sxm.measured; on a CPU "
                                                       "local-cpu.measured)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="where to measure (default: cuda when there is one)")
    a = ap.parse_args(argv)
    cpu = False
    if a.src is not None:
        try:
            records = json.loads(a.src.read_text())
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"--from {a.src}: {e}")
    else:
        import torch
        cpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
        if not cpu and not torch.cuda.is_available():
            sys.exit("--device cuda: there is no CUDA device here; measure with --device cpu, or compare records "
                     "measured on a GPU with --from FILE")
        records = []
        for text in a.case or (CPU_CASES if cpu else DEFAULT_CASES):
            name, spec, docs = parse_case(text)
            records.append(measure(name, spec, docs, "cpu" if cpu else "cuda"))
            if not cpu:
                torch.cuda.empty_cache()  # the case's model went with measure()'s frame
            print(f"measured {name}: fwd {records[-1]['fwd_s'] * 1e3:.1f} ms, bwd {records[-1]['bwd_s'] * 1e3:.1f} ms",
                  flush=True)
        if a.out:
            a.out.write_text(json.dumps(records, indent=1) + "\n")
    compare(records, a.profile or (["local-cpu.measured"] if cpu else ["h200-sxm.analytic", "h200-sxm.measured"]))


if __name__ == "__main__":
    main()
