#!/usr/bin/env python
"""The cost of an SPT pretraining step against plain `fit` and a bare PyTorch loop at the same shape.

    python kernels/bench_spt_step.py             the committed SPT shape; prints a table, writes kernels/results/spt_step_cpu.csv
    python kernels/bench_spt_step.py --quick     a tiny shape and few steps, nothing written (a smoke test)

SPT's pretraining (`trainlab.spt.pretrain`: the mixture DataModule, `SPTLitModule` with per-source losses from the
grouped loss kernel, snapshots) should cost about what any `fit` of the same model and batch costs. Each repeat runs,
back to back in one process and in a rotating order, `--steps` steps of each path from the same initialisation;
a path's cost is its training seconds per step (validation and setup excluded, as the runs' own clocks count them).
The ratios' 95% CIs are t intervals over the repeats on the log scale (`trainlab.stats.ci_ratio`).
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
from trainlab.data import LMDataModule, load_corpus, split_corpus
from trainlab.model import TinyLM
from trainlab.stats import ci_ratio, fmt_num
from trainlab.train import LMLitModule, fit
from trainlab.spt import SPTRunConfig, SPT_ARMS, SPT_MAIN, make_domain, pretrain


def spt_path(rc, steps, domain, general):
    cfg = rc.pretrain.replace(steps=steps, val_every=steps, checkpoint_fracs=(1.0,))
    r = pretrain(domain, SPT_ARMS[SPT_MAIN].delta, cfg, general_corpus=general, enable_model_summary=False)
    return r["train_s"] / steps


def fit_path(rc, steps):
    t = rc.pretrain.train.replace(steps=steps, val_every=steps)
    dm = LMDataModule(corpus="stdlib_code", seq_len=t.seq_len, batch_size=t.batch_size, max_eval_tokens=4096)
    _, hist, _ = fit(t, lambda: LMLitModule(TinyLM(t.model), **t.lit_kwargs()), dm, enable_model_summary=False)
    return hist.train_seconds() / steps


def bare_path(rc, steps, tokens):
    t = rc.pretrain.train
    torch.manual_seed(t.seed)
    model = TinyLM(t.model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - t.seq_len - 1, (steps, t.batch_size), generator=g)
    t0 = time.perf_counter()
    for row in starts:
        x = torch.stack([tokens[s:s + t.seq_len + 1] for s in row.tolist()])
        loss = model(x[:, :-1], labels=x[:, 1:]).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    rc = SPTRunConfig.fast() if a.quick else SPTRunConfig.full()
    repeats, steps = (2, 6) if a.quick else (a.repeats, a.steps)
    domain = make_domain(rc.domains[0][1], rc.domain_tokens(), rc.test_tokens, seed=0)
    general = split_corpus(load_corpus("stdlib_code", "all"))
    tokens = torch.from_numpy(load_corpus("stdlib_code").tokens.astype("int64"))
    paths = {"spt": lambda: spt_path(rc, steps, domain, general), "fit": lambda: fit_path(rc, steps),
             "bare": lambda: bare_path(rc, steps, tokens)}
    costs = {k: [] for k in paths}
    for r in range(repeats):
        order = list(paths)[r % 3:] + list(paths)[:r % 3]
        for k in order:
            costs[k].append(paths[k]())
    rows = []
    for num, den in (("spt", "fit"), ("spt", "bare"), ("fit", "bare")):
        est, lo, hi = ci_ratio(costs[num], costs[den])
        rows.append(dict(ratio=f"{num}/{den}", estimate=est, ci_lo=lo, ci_hi=hi,
                         ms_num=1e3 * sum(costs[num]) / repeats, ms_den=1e3 * sum(costs[den]) / repeats))
    t = rc.pretrain.train
    print(f"shape: d_model {t.model.d_model}, {t.model.n_layers} layers, batch {t.batch_size} x {t.seq_len}; "
          f"{repeats} repeats of {steps} steps; {a.threads} threads, {cpu_name()}")
    for r in rows:
        print(f"{r['ratio']:9s} {fmt_num(r['estimate'])}x [{fmt_num(r['ci_lo'])}, {fmt_num(r['ci_hi'])}]  "
              f"({r['ms_num']:.1f} ms vs {r['ms_den']:.1f} ms a step)")
    if not a.quick:
        out = HERE / "results" / "spt_step_cpu.csv"
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["date", "git_sha", "cpu", "threads", "repeats", "steps", *rows[0]])
            w.writeheader()
            for r in rows:
                w.writerow(dict(date=now_iso(), git_sha=git_sha(), cpu=cpu_name(), threads=a.threads,
                                repeats=repeats, steps=steps, **r))
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
