"""Signal propagation in a pruned 7-layer tanh MLP (seed 004 ch. 4): training loss vs steps for
variance-scaling SNIP, LDI SNIP, and LDI SNIP + approximate-isometry repair, at 90% sparsity.

Run from the repository root (about 7 minutes on 2 shared cores):

    .venv/bin/python -m benchmarks.sigprop_tanh

Model: MLP 784-100x6-10 with tanh (7 Linear layers), Fashion-MNIST. Per seed s: init with the
named scheme (generator s), SNIP on one labelled batch of 100 training images, global 90%
sparsity, optional AI repair (core.sigprop.approximate_isometry, mask fixed); then plain SGD
(lr `--lr`, batch 100, no momentum, as in the thesis' signal-propagation runs) for `--steps`
steps with the mask enforced after every step. The training loss is the mean over each window
of `--every` steps. Also reported: orthogonality score and the input-output Jacobian singular
values (mean, max, min, condition number) of the pruned net before training.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from core import data, models
from core.prune import (
    apply_masks,
    collapsed_layers,
    masked_parameters,
    masks_from_scores,
    snip_scores,
)
from core.sigprop import (
    approximate_isometry,
    init_ldi,
    init_variance_scaling,
    jacobian_singular_values,
    orthogonality_score,
)

ARCH = {"name": "mlp", "widths": [100] * 6, "activation": "tanh"}
CONFIGS = {"vs-snip": ("vs", False), "ldi-snip": ("ldi", False), "ldi-snip-ai": ("ldi", True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/sigprop_tanh.json")
    p.add_argument("--plot", default="docs/figures/sigprop_tanh_loss.png")
    return p.parse_args(argv)


def run(config: str, seed: int, args: argparse.Namespace, splits: data.Splits) -> dict[str, Any]:
    init, repair = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    model = models.build(ARCH, generator=g)
    if init == "vs":
        init_variance_scaling(model, torch.Generator().manual_seed(seed))
    else:
        init_ldi(model, torch.Generator().manual_seed(seed))
    x, y = splits.train.x, splits.train.y
    idx = torch.randperm(len(y), generator=g)[:100]
    masks = masks_from_scores(snip_scores(model, [(x[idx], y[idx])]), args.sparsity)
    apply_masks(model, masks)
    result: dict[str, Any] = {"config": config, "seed": seed,
                              "collapsed": collapsed_layers(masks),
                              "os_before_repair": orthogonality_score(model, masks)}
    if repair:
        rep = approximate_isometry(model, masks)
        result["repair"] = {k: rep[k] for k in ("os_before", "os_after", "steps")}
    result["os"] = orthogonality_score(model, masks)
    jac = jacobian_singular_values(model, splits.val.x[:32])
    result["jacobian"] = {k: v for k, v in jac.items() if k != "values"}
    masked = masked_parameters(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses, window = [], []
    model.train()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(y), (100,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        for w, m in masked:
            w.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for w, m in masked:
                w.mul_(m)
        window.append(float(loss.detach()))
        if step % args.every == 0:
            losses.append(statistics.mean(window))
            window = []
    result["train_s"] = time.perf_counter() - started
    result["loss"] = losses
    return result


def plot(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for color, config in zip(("tab:blue", "tab:orange", "tab:green"), CONFIGS, strict=True):
        runs = [r["loss"] for r in results if r["config"] == config]
        steps = [args.every * (i + 1) for i in range(len(runs[0]))]
        mean = [statistics.mean(v) for v in zip(*runs, strict=True)]
        ax.plot(steps, mean, color=color, label=f"{config} (mean of {len(runs)} seeds)")
        ax.fill_between(steps, [min(v) for v in zip(*runs, strict=True)],
                        [max(v) for v in zip(*runs, strict=True)], color=color, alpha=0.2)
    ax.set_xlabel("SGD step")
    ax.set_ylabel(f"training loss (mean over {args.every} steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"7-layer tanh MLP, SNIP at {100 * args.sparsity:g}% sparsity, Fashion-MNIST")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, format="png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = data.split(train_set, test_set, 0)
    started = time.perf_counter()
    results = [run(c, s, args, splits) for s in range(args.seeds) for c in CONFIGS]
    lines = ["| configuration | OS (before training) | Jacobian sv mean / min / max / cond "
             "| loss @ step " + " | loss @ ".join(str(s) for s in (args.every, 500, 1000,
                                                                   args.steps)) + " |",
             "|---" * 7 + "|"]
    for config in CONFIGS:
        rs = [r for r in results if r["config"] == config]

        def mean(f, rs=rs):
            return statistics.mean(f(r) for r in rs)
        jac = " / ".join(f"{mean(lambda r, k=k: r['jacobian'][k]):.3g}"
                         for k in ("mean", "min", "max", "condition_number"))
        cells = [f"{mean(lambda r, i=i: r['loss'][i]):.3f}"
                 for i in (0, 500 // args.every - 1, 1000 // args.every - 1, -1)]
        lines.append(f"| {config} | {mean(lambda r: r['os']):.3f} | {jac} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    plot(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "runtime_s": time.perf_counter() - started, "results": results, "table_md": table},
        indent=1))


if __name__ == "__main__":
    main()
