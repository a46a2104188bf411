#!/usr/bin/env python
"""fp32 vs bf16 autocast on the CPU: a training step (forward + backward + AdamW) of each reproduction's model shape.

    python kernels/bench_precision.py            every shape; prints a table, writes kernels/results/precision_cpu.csv
    python kernels/bench_precision.py --quick    one tiny shape, nothing written (a smoke test)

Speed is a ratio measured side by side in one process: each repeat times a few fp32 steps and a few bf16 steps
back to back (alternating which goes first), and the speedup's 95% CI is a t interval over the repeats on the log
scale (`trainlab.stats.ci_ratio`). Quality: from the same initialisation and the same batches of `stdlib_code`
windows (next-byte prediction), both precisions train `--loss-steps` steps; the table shows both final losses
(the mean of the last 5 steps, in nats per token).
"""
import argparse, csv, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.core import cpu_name, now_iso, git_sha, set_threads
from trainlab.data import load_corpus
from trainlab.model import ModelConfig, TinyLM
from trainlab.stats import ci_ratio, fmt_num

# each reproduction's model and batch (from its full-run config)
SHAPES = {
    "baseline":   dict(model=ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=256), batch=16, seq=256),
    "moe":        dict(model=ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=256), batch=16, seq=256),  # its dense backbone
    "curriculum": dict(model=ModelConfig(d_model=64, n_layers=4, n_heads=2, max_seq_len=1024), batch=16, seq=1024),
    "spt":        dict(model=ModelConfig(d_model=64, n_layers=4, n_heads=2, max_seq_len=256), batch=16, seq=256),
    "unlearning": dict(model=ModelConfig(vocab_size=556, d_model=128, n_layers=4, n_heads=4, max_seq_len=256), batch=32, seq=128),
}
QUICK = {"tiny": dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), batch=4, seq=64)}


def make_step(model, opt, bf16: bool):
    def step(x):  # x: [B, L + 1] tokens; predict each next one
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x[:, :-1], labels=x[:, 1:]).loss.mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def time_steps(step, x, n):
    t0 = time.perf_counter()
    for _ in range(n): step(x)
    return (time.perf_counter() - t0) / n


def bench_shape(name, spec, repeats, steps, loss_steps, seed=0):
    cfg, B, L = spec["model"], spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.from_numpy(load_corpus("stdlib_code").tokens.astype("int64"))
    starts = torch.randint(0, len(tokens) - L - 1, (max(loss_steps, 1), B), generator=g)
    batches = [torch.stack([tokens[s:s + L + 1] for s in row.tolist()]) for row in starts]
    torch.manual_seed(seed); model = TinyLM(cfg); init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps_by = {p: make_step(model, opt, p == "bf16") for p in ("fp32", "bf16")}
    for p in ("fp32", "bf16"): time_steps(steps_by[p], batches[0], 2)  # warm-up (allocator, oneDNN kernels)
    t = {"fp32": [], "bf16": []}
    for r in range(repeats):
        for p in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")): t[p].append(time_steps(steps_by[p], batches[0], steps))
    speedup, lo, hi = ci_ratio(t["fp32"], t["bf16"])
    final = {}
    for p in ("fp32", "bf16"):  # the same initialisation and batches for both
        model.load_state_dict(init); opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = make_step(model, opt, p == "bf16")
        losses = [step(x) for x in batches[:loss_steps]]
        final[p] = sum(losses[-5:]) / len(losses[-5:])
    n_tok = B * L
    return {"shape": name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "batch": B, "seq_len": L,
            "fp32_ms": 1e3 * sorted(t["fp32"])[len(t["fp32"]) // 2], "bf16_ms": 1e3 * sorted(t["bf16"])[len(t["bf16"]) // 2],
            "fp32_tokens_per_s": n_tok / sorted(t["fp32"])[len(t["fp32"]) // 2], "speedup": speedup, "speedup_lo": lo, "speedup_hi": hi,
            "repeats": repeats, "loss_steps": loss_steps, "fp32_final_loss": final["fp32"], "bf16_final_loss": final["bf16"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tiny shape, nothing written")
    ap.add_argument("--shapes", nargs="*", default=None, help=f"a subset of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per precision (default 8; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    ap.add_argument("--loss-steps", type=int, default=None, help="steps of the loss comparison (default 40; 5 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 8)")
    ap.add_argument("--out", default=str(HERE / "results" / "precision_cpu.csv"))
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    shapes = QUICK if args.quick else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    repeats = args.repeats or (2 if args.quick else 8)
    loss_steps = args.loss_steps or (5 if args.quick else 40)
    rows = []
    print(f"{cpu_name()}, {threads} threads, torch {torch.__version__}")
    print("| shape | d x layers | batch x seq | fp32 ms/step | bf16 ms/step | bf16 speedup [95% CI] | final loss fp32 / bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in shapes.items():
        r = bench_shape(name, spec, repeats, args.steps, loss_steps)
        rows.append(r)
        print(f"| {name} | {r['d_model']} x {r['n_layers']} | {r['batch']} x {r['seq_len']} | {r['fp32_ms']:.0f} | {r['bf16_ms']:.0f} | "
              f"{r['speedup']:.2f}x [{fmt_num(r['speedup_lo'])}, {fmt_num(r['speedup_hi'])}] | {r['fp32_final_loss']:.3f} / {r['bf16_final_loss']:.3f} |", flush=True)
    if args.quick: return rows
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "git_sha": git_sha(), "timestamp": now_iso()}
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], *meta]); w.writeheader()
        for r in rows: w.writerow({**{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}, **meta})
    print(f"-> {out}")
    return rows


if __name__ == "__main__":
    main()
