"""The benchmark harness of the `kernels/bench_<op>.py` scripts, which import it as `benchlib`.

A script defines `setup(provider, mode, x)` returning `(fn, grad_to_none)` (usually through
`make_mode_fn`), or raising `SkipCase`, and `run_bench` does the rest, following Liger-Kernel's
benchmark conventions:

- speed: `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` on CUDA (after its own warm-up,
  so first-call JIT compilation is excluded); on CPU a plain timer (median and 20/80% quantiles of
  repeated calls after warm-up), good enough for smoke runs only;
- memory: the peak of `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` over a
  few calls, in MB (live inputs included); `None` on CPU;
- modes: `forward`, `backward` (re-running backward through a retained graph) and `full`
  (forward + backward);
- rows appended to one long-format CSV, `kernels/results/all.csv`, with Liger's columns
  (`CSV_COLUMNS`). The file is rewritten atomically (temporary file, then `os.replace`).
  `OVERWRITE=1` (or `overwrite=True`) first drops earlier rows of the same kernel on the same GPU;
  `plot_results` draws one PNG per metric and mode.

This module is part of the kernel workbench, not of the `trainlab` package: the kernels, their
references and `read_rows` come from `trainlab`. `tests/test_kernels_utils.py` tests it.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab import __version__
from trainlab.core import atomic_path, check_choice, git_sha, now_iso
from trainlab.kernels.parity_plot import read_rows
from trainlab.kernels.utils import HAS_TRITON, interpreting, triton

CSV_COLUMNS = (
    "kernel_name",
    "kernel_provider",
    "kernel_operation_mode",
    "metric_name",
    "metric_unit",
    "x_name",
    "x_label",
    "x_value",
    "y_value_50",
    "y_value_20",
    "y_value_80",
    "extra_benchmark_config_str",
    "gpu_name",
    "timestamp",
    "version",
)
QUANTILES = (0.5, 0.2, 0.8)
MODES = ("forward", "backward", "full")


class SkipCase(Exception):
    "Raised by a `setup` when a provider, mode or size cannot run here (no package, no GPU, ...)."


def device_label(device: str | torch.device) -> str:
    "The `gpu_name` column: the CUDA device name, or `'cpu'`."
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(xs: Sequence[float], qs: Sequence[float] = QUANTILES) -> tuple:
    "The `qs` quantiles of `xs`, interpolated linearly (numpy's default)."
    xs = sorted(xs)

    def q(p):
        i = p * (len(xs) - 1)
        lo = math.floor(i)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

    return tuple(q(p) for p in qs)


def bench(
    fn: Callable,  # the call to time
    device: str | torch.device = "cuda",
    grad_to_none: Sequence[torch.Tensor] | None = None,  # their .grad is reset between calls
    warmup: int = 25,
    rep: int = 100,  # CUDA: milliseconds (do_bench); CPU: numbers of calls
) -> tuple[float, float, float]:
    "Median, 20% and 80% quantiles of `fn`'s run time in ms."
    device = torch.device(device)
    if device.type == "cuda" and HAS_TRITON:
        from triton.testing import do_bench

        return tuple(
            do_bench(
                fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
            )
        )
    warmup, rep = min(warmup, 3), max(3, min(rep, 10))  # CPU smoke timing: a few calls are enough

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(warmup):
        reset()
        fn()
    _sync(device)
    times = []
    for _ in range(rep):
        reset()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def peak_memory(
    fn: Callable, device: str | torch.device = "cuda", iters: int = 3
) -> tuple[float, float, float] | None:
    "Quantiles of the peak CUDA memory (MB) during `fn`, live inputs included; `None` off CUDA."
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peaks = []
    for _ in range(iters):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    return quantiles(peaks)


def make_mode_fn(
    mode: str,  # "forward", "backward" or "full"
    forward: Callable[[], torch.Tensor],  # runs the op, returns its output
    grad_inputs: Sequence[torch.Tensor] = (),  # leaves whose grads are reset between calls
) -> tuple[Callable, list]:
    "`(fn, grad_to_none)` that times `mode` of `forward` (backward reuses one retained graph)."
    check_choice("mode", mode, MODES)
    grad_inputs = list(grad_inputs)
    if mode == "forward":
        return forward, grad_inputs
    y = forward()
    dy = torch.ones_like(y) if y.ndim == 0 else torch.randn_like(y)
    if mode == "backward":
        return (lambda: y.backward(dy, retain_graph=True)), grad_inputs
    return (lambda: forward().backward(dy)), grad_inputs


def bench_version() -> str:
    "The `version` column: trainlab's version plus the git commit, if any."
    sha = git_sha()
    return __version__ + (f"+g{sha[:9]}{'-dirty' if sha.endswith('-dirty') else ''}" if sha else "")


def bench_row(
    kernel_name: str,
    provider: str,
    mode: str,
    metric_name: str,
    metric_unit: str,
    x_name: str,
    x_label: str,
    x_value,
    y: Sequence[float],
    extra_config: dict | None = None,
    gpu_name: str = "cpu",
) -> dict:
    "One CSV row (a dict keyed by `CSV_COLUMNS`); `y` holds the 50/20/80% quantiles."
    return dict(
        kernel_name=kernel_name,
        kernel_provider=provider,
        kernel_operation_mode=mode,
        metric_name=metric_name,
        metric_unit=metric_unit,
        x_name=x_name,
        x_label=x_label,
        x_value=x_value,
        y_value_50=y[0],
        y_value_20=y[1],
        y_value_80=y[2],
        extra_benchmark_config_str=json.dumps(extra_config or {}, sort_keys=True),
        gpu_name=gpu_name,
        timestamp=now_iso(),
        version=bench_version(),
    )


def append_rows(
    rows: Sequence[dict],  # new rows (from bench_row)
    path: str | Path,  # the CSV, e.g. kernels/results/all.csv
    overwrite: bool | None = None,  # drop earlier rows of this kernel and GPU; default: OVERWRITE=1
) -> Path:
    "Append `rows` to the CSV at `path`, rewriting it atomically."
    path = Path(path)
    if overwrite is None:
        overwrite = os.environ.get("OVERWRITE", "0").strip().lower() in ("1", "true", "yes")
    old = read_rows(path)
    if overwrite:
        drop = {(r["kernel_name"], r["gpu_name"]) for r in rows}
        old = [r for r in old if (r["kernel_name"], r["gpu_name"]) not in drop]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in [*old, *rows]:
                w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    return path


def safe_name(s: str) -> str:
    "`s` as a file name: runs of characters other than letters, digits, `._-` become `_`."
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "unknown"


def plot_results(
    path: str | Path,  # the results CSV
    kernel_name: str,
    gpu_name: str,
    out_dir: str | Path | None = None,  # default: <csv folder>/<gpu_name>/
) -> list[Path]:
    "One PNG per metric and mode (median, 20-80% band, one line per provider); returns the files."
    from matplotlib.figure import (
        Figure,
    )  # no pyplot: no global backend switch, nothing left open, works headless

    path = Path(path)
    out_dir = Path(out_dir) if out_dir is not None else path.parent / safe_name(gpu_name)
    rows = [
        r for r in read_rows(path) if r["kernel_name"] == kernel_name and r["gpu_name"] == gpu_name
    ]
    files = []
    for metric, mode in sorted({(r["metric_name"], r["kernel_operation_mode"]) for r in rows}):
        sel = [r for r in rows if r["metric_name"] == metric and r["kernel_operation_mode"] == mode]
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for prov in sorted({r["kernel_provider"] for r in sel}):
            pts = sorted(
                (
                    float(r["x_value"]),
                    float(r["y_value_50"]),
                    float(r["y_value_20"]),
                    float(r["y_value_80"]),
                )
                for r in sel
                if r["kernel_provider"] == prov
            )
            xs, y50, y20, y80 = zip(*pts)
            ax.plot(xs, y50, marker="o", label=prov)
            ax.fill_between(xs, y20, y80, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(sel[0]["x_label"])
        ax.set_ylabel(f"{metric} ({sel[0]['metric_unit']})")
        ax.set_title(f"{kernel_name} {mode} on {gpu_name}")
        ax.legend()
        ax.grid(alpha=0.3)
        f = out_dir / f"{safe_name(kernel_name)}_{metric}_{mode}.png"
        with atomic_path(f) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        files.append(f)
    return files


def require_compiled(
    provider: str, on_cuda: bool, gpu_providers: Sequence[str] = ("trainlab", "liger")
):
    "Skip a case (`SkipCase`) whose provider needs compiled GPU kernels not available here."
    if provider not in gpu_providers:
        return
    if not on_cuda:
        raise SkipCase(
            "Triton/CUDA kernels are timed on CUDA only (the interpreter is for correctness)"
        )
    if provider == "trainlab" and interpreting():
        raise SkipCase("kernels were defined under TRITON_INTERPRET=1; unset it to time them")


def allow_retained_graph_backward():
    "Switch off torch.compile's donated buffers: they forbid re-running backward on a graph."
    import torch._functorch.config as fc

    if hasattr(fc, "donated_buffer"):
        fc.donated_buffer = False


def _log_case(log, kernel_name, prov, mode, x_name, x, speed, mem):
    speed_s = f"{speed[0]:9.3f} ms [{speed[1]:.3f}, {speed[2]:.3f}]" if speed else ""
    mem_s = f"  {mem[0]:9.1f} MB" if mem else ""
    log(f"{kernel_name:<28} {prov:<14} {mode:<8} {x_name}={x:<7} " + speed_s + mem_s)


def run_bench(
    kernel_name: str,
    setup: Callable,
    providers: Sequence[str],
    modes: Sequence[str],
    x_name: str,
    x_label: str,
    x_values: Sequence,
    *,
    device: str | torch.device = "cuda",
    extra_config: dict | None = None,  # shared config, stored as JSON in each row
    csv_path: str | Path | None = None,  # append rows here (None: do not record)
    overwrite: bool | None = None,
    plot: bool = True,
    metrics: Sequence[str] = ("speed", "memory"),
    log: Callable = print,
) -> list[dict]:
    "Benchmark every (x, provider, mode) case of `setup`; return the rows (record, plot if asked)."
    gpu = device_label(device)
    extra = dict(
        extra_config or {}, torch=torch.__version__, triton=getattr(triton, "__version__", None)
    )
    rows = []
    for x in x_values:
        for prov in providers:
            for mode in modes:
                case = f"{kernel_name:<28} {prov:<14} {mode:<8} {x_name}={x}"
                try:
                    fn, grad_to_none = setup(provider=prov, mode=mode, x=x)
                    speed = (
                        bench(fn, device, grad_to_none=grad_to_none) if "speed" in metrics else None
                    )
                    mem = peak_memory(fn, device) if "memory" in metrics else None
                except SkipCase as e:
                    log(f"skip  {case}: {e}")
                    continue
                except torch.cuda.OutOfMemoryError:
                    log(f"OOM   {case}")
                    torch.cuda.empty_cache()
                    continue
                finally:
                    fn = grad_to_none = None
                args = (x_name, x_label, x)
                if speed is not None:
                    rows.append(
                        bench_row(kernel_name, prov, mode, "speed", "ms", *args, speed, extra, gpu)
                    )
                if mem is not None:
                    rows.append(
                        bench_row(kernel_name, prov, mode, "memory", "MB", *args, mem, extra, gpu)
                    )
                _log_case(log, kernel_name, prov, mode, x_name, x, speed, mem)
    if csv_path is not None and rows:
        append_rows(rows, csv_path, overwrite=overwrite)
        log(f"appended {len(rows)} rows to {csv_path}")
        if plot:
            for f in plot_results(csv_path, kernel_name, gpu):
                log(f"plot {f}")
    return rows


def bench_argparser(description: str) -> argparse.ArgumentParser:
    "The common command line of `kernels/bench_*.py`."
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny sweep (a smoke test; the default on CPU)"
    )
    p.add_argument("--providers", nargs="*", default=None, help="subset of providers to run")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--dtype",
        default=None,
        help="bfloat16, float16 or float32 (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--record", action="store_true", help="append rows to the CSV even on CPU")
    p.add_argument("--no-record", action="store_true", help="do not append rows (default on CPU)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="drop earlier rows of this kernel and GPU (same as OVERWRITE=1)",
    )
    p.add_argument(
        "--csv",
        default=None,
        help="results CSV (default: kernels/results/all.csv next to the script)",
    )
    return p
