"""Is the loss barrier between two MNIST MLPs trained from different seeds near zero once
their hidden units are aligned (Git Re-Basin's claim)? MLPs 784-512-512-512-10 on the
offline MNIST (8,000 training, 2,000 test images); for each pair of three seeds, the loss
and accuracy along the straight line between the models, naive, after weight matching and
after the straight-through learned permutation; and three models merged by averaging, naive
and after aligning two of them to the third.

    python benchmarks/permutation_alignment.py            # the committed run (minutes)
    python benchmarks/permutation_alignment.py --smoke

Writes results/permutation_alignment.{json,md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import stamped, write_results  # noqa: E402

from pvtune.discrete import (  # noqa: E402
    average,
    chain_of,
    interpolate,
    learn_permutation_ste,
    loss_barrier,
    permute_chain,
    relu_chain_forward,
    weight_matching,
)
from pvtune.vision.data import load_images  # noqa: E402
from pvtune.vision.models import MLP  # noqa: E402

QUESTION = ("Is the loss barrier between MNIST MLPs (784-512-512-512-10) from different seeds "
            "near zero after weight matching or a straight-through learned permutation, and "
            "does aligning make averaging three models work?")


def train_mlp(data, sizes: tuple[int, ...], seed: int, epochs: int, batch: int, lr: float):
    """A ReLU MLP trained with Adam from ``seed``; returns its chain."""
    torch.manual_seed(seed)
    model = MLP(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x, y = data.train_x.flatten(1), data.train_y
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return chain_of([model.stem, *model.hidden, model.head])


@torch.no_grad()
def evaluate(chain, x, y) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    logits = relu_chain_forward(chain, x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def curve(a, b, x, y, points: int) -> dict:
    """Loss and accuracy at evenly spaced points of the line from ``a`` to ``b``."""
    losses, accs = [], []
    for alpha in torch.linspace(0, 1, points).tolist():
        loss, acc = evaluate(interpolate(a, b, alpha), x, y)
        losses.append(loss)
        accs.append(acc)
    return {"loss": losses, "accuracy": accs, "loss_barrier": loss_barrier(losses),
            "accuracy_barrier": loss_barrier([-v for v in accs])}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--ste-steps", type=int, default=200)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--dataset", default="mnist", help="image data (digits: the offline 8x8 set)")
    p.add_argument("--name", default="permutation_alignment")
    args = p.parse_args(argv)
    data = load_images(args.dataset)
    if args.smoke:
        args.epochs, args.hidden, args.points, args.ste_steps = 1, 32, 3, 2
        data = data.subset(train=512, test=256)
    pixels = data.train_x[0].numel()
    sizes = (pixels, args.hidden, args.hidden, args.hidden, 10)
    x_tr, y_tr = data.train_x.flatten(1), data.train_y
    x_te, y_te = data.test_x.flatten(1), data.test_y
    start = time.perf_counter()
    chains = [train_mlp(data, sizes, s, args.epochs, 128, 1e-3) for s in range(args.models)]
    train_s = time.perf_counter() - start
    endpoints = [evaluate(c, x_te, y_te) for c in chains]
    rows, curves = [], {}
    g = torch.Generator().manual_seed(0)

    def ste_loss(c):
        idx = torch.randint(0, len(x_tr), (256,), generator=g)
        return F.cross_entropy(relu_chain_forward(c, x_tr[idx]), y_tr[idx])

    timings = {"weight matching": [], "STE permutation": []}
    for i, j in itertools.combinations(range(args.models), 2):
        a, b = chains[i], chains[j]
        t0 = time.perf_counter()
        wm = permute_chain(b, weight_matching(a, b, seed=i * 10 + j))
        timings["weight matching"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ste = permute_chain(b, learn_permutation_ste(a, b, ste_loss, args.ste_steps, lr=1e-3,
                                                     seed=i * 10 + j))
        timings["STE permutation"].append(time.perf_counter() - t0)
        for method, other in (("naive", b), ("weight matching", wm), ("STE permutation", ste)):
            test = curve(a, other, x_te, y_te, args.points)
            train = curve(a, other, x_tr, y_tr, args.points)
            curves[f"{i}-{j} {method}"] = test
            rows.append({"pair": f"{i}-{j}", "method": method,
                         "test_loss_barrier": test["loss_barrier"],
                         "test_accuracy_barrier": test["accuracy_barrier"],
                         "train_loss_barrier": train["loss_barrier"],
                         "midpoint_test_accuracy": test["accuracy"][len(test["accuracy"]) // 2],
                         "seconds": (statistics.mean(timings[method]) if method in timings
                                     else 0.0)})
    summary = []
    for method in ("naive", "weight matching", "STE permutation"):
        rs = [r for r in rows if r["method"] == method]
        summary.append(stamped({
            "case": f"pairs: {method}", "pairs": len(rs),
            "test_loss_barrier": statistics.mean(r["test_loss_barrier"] for r in rs),
            "test_accuracy_barrier": statistics.mean(r["test_accuracy_barrier"] for r in rs),
            "train_loss_barrier": statistics.mean(r["train_loss_barrier"] for r in rs),
            "test_accuracy": statistics.mean(r["midpoint_test_accuracy"] for r in rs),
            "seconds": statistics.mean(r["seconds"] for r in rs), "per_pair": rs}))
    merged = {"naive": average(chains)}
    aligned = [chains[0]] + [permute_chain(c, weight_matching(chains[0], c)) for c in chains[1:]]
    merged["weight matching"] = average(aligned)
    for method, chain in merged.items():
        loss, acc = evaluate(chain, x_te, y_te)
        summary.append(stamped({"case": f"merge {args.models}: {method}",
                                "pairs": 0, "test_loss": loss, "test_accuracy": acc}))
    mean_end_acc = statistics.mean(a for _, a in endpoints)
    for r in summary:
        print(r["case"], {k: round(v, 4) for k, v in r.items()
                          if isinstance(v, float)}, flush=True)
    notes = (f"{args.dataset} ({len(x_tr)} training, {len(x_te)} test images), MLP "
             f"{'-'.join(map(str, sizes))} with ReLU, Adam lr 1e-3, {args.epochs} epochs of "
             f"batch 128, seeds 0..{args.models - 1}; the models' own test accuracy "
             f"{100 * mean_end_acc:.2f}% (mean), test loss "
             f"{statistics.mean(v for v, _ in endpoints):.4f}; training took {train_s:.0f} s. "
             f"Barriers: the largest excess over the straight line between the end points "
             f"(loss; for accuracy, the largest drop), on {args.points} evenly spaced points, "
             "averaged over the pairs (each pair in the JSON). test_accuracy: at the midpoint "
             "for pairs, of the merged model for merges. Weight matching: coordinate descent "
             "of linear assignments (scipy) until no permutation changes; STE permutation: "
             f"{args.ste_steps} Adam steps (lr 1e-3, batch 256) on the midpoint loss, each "
             "projecting onto the nearest permutation by weight matching; seconds: its time "
             "per pair. Paper setting (Git Re-Basin): the same MLP on the full MNIST (60k), "
             "near-zero barrier after weight matching or STE.")
    columns = ["case", "test_loss_barrier", "test_accuracy_barrier", "train_loss_barrier",
               "test_loss", "test_accuracy", "seconds"]
    write_results(args.name, QUESTION, summary, columns, key=["case"], notes=notes,
                  extra={"curves": curves, "endpoints": endpoints})
    plot(curves, common.RESULTS / f"{args.name}.png")
    return summary


def plot(curves: dict, path: Path) -> None:
    """Test loss and accuracy along the line, per pair and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"naive": "tab:red", "weight matching": "tab:blue", "STE permutation": "tab:green"}
    seen = set()
    for name, c in curves.items():
        method = name.split(" ", 1)[1]
        alphas = torch.linspace(0, 1, len(c["loss"])).tolist()
        label = method if method not in seen else None
        seen.add(method)
        ax1.plot(alphas, c["loss"], color=colors[method], alpha=0.7, label=label)
        ax2.plot(alphas, [100 * v for v in c["accuracy"]], color=colors[method], alpha=0.7,
                 label=label)
    ax1.set_ylabel("test loss")
    ax2.set_ylabel("test accuracy (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("alpha (model A -> model B)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
