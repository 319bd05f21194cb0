"""The estimator studies: named sets of training runs on a small image classifier, each run
with several seeds, written as JSON + markdown + PNG with the command that reproduces them.

``pvtune study NAME`` runs one; :data:`STUDIES` lists them with the question each answers,
the paper's own setting and claim, and the gap between that setting and this one.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvtune.errors import ConfigError
from pvtune.optim.strategies import VStepConfig
from pvtune.qat.config import ActivationQuantConfig, EstimatorConfig, QATConfig
from pvtune.report import format_table, machine_info, source_commit
from pvtune.reprs.base import ReprConfig
from pvtune.reprs.binary import BinaryConfig, TernaryConfig
from pvtune.reprs.grouped_codebook import GroupedCodebookConfig
from pvtune.reprs.sparse import NMSparseConfig
from pvtune.reprs.uniform import UniformConfig
from pvtune.vision.data import ImageData, load_images
from pvtune.vision.train import PVMethod, TorchPruningPeer, TrainConfig, train_classifier

REPRESENTATIONS: dict[str, Callable[[], ReprConfig | None]] = {
    "fp32": lambda: None,
    "binary": BinaryConfig,
    "ternary": TernaryConfig,
    "uniform2": lambda: UniformConfig(bits=2, group_size=None, symmetric=True),
    "uniform4": lambda: UniformConfig(bits=4, group_size=None, symmetric=True),
    "2:4": lambda: NMSparseConfig(2, 4),
    "jlcm2": lambda: GroupedCodebookConfig(bits=2, groups=4),
    "jlcm2-quantiles": lambda: GroupedCodebookConfig(bits=2, groups=4, grouping="quantiles"),
}


def representation_from_name(name: str) -> ReprConfig | None:
    """``fp32`` (None), ``binary``, ``ternary``, ``uniform2``, ``uniform4`` (symmetric, one
    step per output channel), ``2:4`` (N:M sparsity), ``jlcm2`` or ``jlcm2-quantiles`` (2-bit
    grouped codebooks, 4 row groups per layer)."""
    if name not in REPRESENTATIONS:
        raise ConfigError(f"unknown representation {name!r}; known: "
                          f"{', '.join(REPRESENTATIONS)}")
    return REPRESENTATIONS[name]()


def method_for(representation: str, estimator: str = "ste", *, activations: str = "none",
               pv: bool = False, strategy: str = "subspace_v_ste"
               ) -> QATConfig | PVMethod | None:
    """The training method of a run from names: full precision, QAT with ``estimator``
    (activations ``none``, ``sign`` or ``4bit`` (unsigned LSQ)), or PV-Tuning (``pv``) with
    the discrete step ``strategy``."""
    rep = representation_from_name(representation)
    if rep is None:
        if pv or activations != "none":
            raise ConfigError("fp32 takes neither PV-Tuning nor activation quantization")
        return None
    if pv:
        if activations != "none":
            raise ConfigError("PV-Tuning here trains weights only: leave the activations "
                              "unquantized (activations='none')")
        return PVMethod(rep, VStepConfig(strategy=strategy))
    acts = {"none": None,
            "sign": ActivationQuantConfig(bits=1, estimator=_sign_estimator(estimator)),
            "4bit": ActivationQuantConfig(bits=4, signed=False, estimator="lsq")}
    if activations not in acts:
        raise ConfigError(f"activations must be none, sign or 4bit, got {activations!r}")
    return QATConfig(rep, EstimatorConfig(estimator), acts[activations])


def _sign_estimator(name: str) -> str:
    """Sign activations use the weights' sign estimator, or plain STE for a non-sign one."""
    return name if name in ("ste", "clipped_ste", "approx_sign", "reste") else "ste"


@dataclass(frozen=True)
class Arm:
    """One configuration of a study: a label and how to train it."""

    label: str
    representation: str
    estimator: str = "ste"
    activations: str = "none"
    pv: bool = False
    act: str = "relu"
    peer: bool = False  # torch.ao.pruning's N:M sparsifier instead of pvtune (2:4 only)
    strategy: str = "subspace_v_ste"  # the discrete step of a PV arm

    def config(self, base: TrainConfig, seed: int) -> TrainConfig:
        """The run's config for ``seed``."""
        if self.peer:
            if self.representation != "2:4":
                raise ConfigError("the peer arm (torch.ao.pruning) is for 2:4 sparsity only")
            method = TorchPruningPeer(2, 4)
        else:
            method = method_for(self.representation, self.estimator,
                                activations=self.activations, pv=self.pv,
                                strategy=self.strategy)
        return dataclasses.replace(base, method=method, seed=seed, act=self.act)


@dataclass(frozen=True)
class Study:
    """A question answered by training every arm on ``dataset`` with several seeds."""

    name: str
    question: str
    arms: tuple[Arm, ...]
    dataset: str = "fashion-mnist"
    train_examples: int | None = None
    base: TrainConfig = TrainConfig()
    paper: str = ""


_BINARY_WA = dict(representation="binary", activations="sign", act="identity")
STUDIES: dict[str, Study] = {
    "binary": Study(
        "binary",
        "Binary weights and activations (sign), small CNN on Fashion-MNIST: does ReSTE match "
        "or beat STE, clipped STE and ApproxSign in accuracy, with a better estimating-error / "
        "gradient-stability trade-off? How far is the binary network from FP32?",
        (Arm("fp32", "fp32"), Arm("STE", estimator="ste", **_BINARY_WA),
         Arm("clipped STE", estimator="clipped_ste", **_BINARY_WA),
         Arm("ApproxSign", estimator="approx_sign", **_BINARY_WA),
         Arm("ReSTE (o 1->3)", estimator="reste", **_BINARY_WA)),
        train_examples=25000, base=TrainConfig(epochs=3, batch_size=128, lr=2e-3),
        paper="ReSTE (Wu et al. 2023): CIFAR-10 ResNet-20, 1-bit W/A, 1000 epochs, 86.75%; "
              "ReSTE at least as accurate as STE with a better estimating-error / stability "
              "trade-off."),
    "ternary": Study(
        "ternary",
        "Ternary (BitNet b1.58 absmean) and 2-bit uniform weights, small CNN on Fashion-MNIST: "
        "STE against LSQ's learned step.",
        (Arm("fp32", "fp32"), Arm("ternary STE", "ternary", "ste"),
         Arm("ternary LSQ", "ternary", "lsq"), Arm("2-bit STE", "uniform2", "ste"),
         Arm("2-bit LSQ", "uniform2", "lsq")),
        train_examples=25000, base=TrainConfig(epochs=3, batch_size=128, lr=2e-3),
        paper="BitNet b1.58 (Ma et al. 2024): LLMs trained from scratch with absmean ternary "
              "weights and STE; LSQ (Esser et al. 2019): ImageNet ResNets at 2-4 bits, the "
              "learned step beats fixed ranges."),
    "sparse": Study(
        "sparse",
        "2:4 sparsity from scratch, MLP (784-512-512-512-10, the hidden 512x512 layers 2:4) on "
        "Fashion-MNIST: dense, plain STE and SR-STE (lambda_w 2e-4): is SR-STE more accurate "
        "with fewer mask flips (SAD)? Peer: PyTorch's torch.ao.pruning WeightNormSparsifier "
        "(magnitude 2:4 mask recomputed every step; it handles linear layers only, hence the "
        "MLP).",
        (Arm("dense", "fp32"), Arm("2:4 STE", "2:4", "ste"), Arm("2:4 SR-STE", "2:4", "sr_ste"),
         Arm("2:4 torch.ao.pruning (peer)", "2:4", peer=True)),
        train_examples=25000,
        base=TrainConfig(epochs=3, batch_size=128, lr=1e-3, arch="mlp", hidden=512),
        paper="SR-STE (Zhou et al. 2021): ImageNet ResNet-50, 2:4 at 77.0% vs dense 77.3%; "
              "more accurate than STE with far lower SAD."),
    "pv-vs-ste": Study(
        "pv-vs-ste",
        "Beyond STE on the same nets: PV-Tuning (continuous parameters by Adam, codes by the "
        "subspace V step, from the rounded initial network) against the best estimators at "
        "equal steps, for binary and ternary weights (activations full precision).",
        (Arm("binary STE", "binary", "ste"), Arm("binary ReSTE", "binary", "reste"),
         Arm("binary PV", "binary", pv=True), Arm("ternary LSQ", "ternary", "lsq"),
         Arm("ternary PV", "ternary", pv=True)),
        train_examples=25000, base=TrainConfig(epochs=3, batch_size=128, lr=2e-3),
        paper="PV-Tuning (Malinovskii et al. 2024): LLM fine-tuning at 1-2 bits per weight, "
              "PV beats STE-style fine-tuning; this asks whether that holds for small CNNs "
              "trained from scratch."),
    "jlcm": Study(
        "jlcm",
        "2-bit weights of a small CNN on Fashion-MNIST trained by PV-Tuning from the rounded "
        "initial network: JLCM's grouped codebooks (4 row groups per layer, grouped by "
        "moments or by quantiles; PV-Tuning's subspace step or JLCM's proximal mapping "
        "update) against a 2-bit uniform grid per output channel (PV-Tuning and STE).",
        (Arm("fp32", "fp32"), Arm("2-bit uniform STE", "uniform2", "ste"),
         Arm("2-bit uniform PV", "uniform2", pv=True),
         Arm("JLCM moments PV", "jlcm2", pv=True),
         Arm("JLCM quantiles PV", "jlcm2-quantiles", pv=True),
         Arm("JLCM moments proximal", "jlcm2", pv=True, strategy="proximal_v")),
        train_examples=25000, base=TrainConfig(epochs=3, batch_size=128, lr=2e-3),
        paper="JLCM (Yvinec et al. 2024): post-training compression of ImageNet CNNs and "
              "LLMs (Llama 7B in 2 GB) by grouped codebooks learned with their mappings; "
              "this trains a small CNN from scratch instead."),
}


def run_study(name: str, output: Path, *, seeds: int = 3, epochs: int | None = None,
              train_examples: int | None = None, data_root: Path | None = None,
              progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run study ``name`` (``seeds`` seeds per arm), write ``output/study_<name>.{json,md,png}``
    and return the JSON record. ``epochs`` / ``train_examples`` override the study's (a
    shorter smoke run; the record says so)."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    study = STUDIES[name]
    base = study.base if epochs is None else dataclasses.replace(study.base, epochs=epochs)
    data = load_images(study.dataset, root=data_root)
    limit = train_examples or study.train_examples
    if limit is not None:
        data = data.subset(train=limit)
    start = time.perf_counter()
    arms = []
    for arm in study.arms:
        runs = []
        for seed in range(seeds):
            result = train_classifier(arm.config(base, seed), data, progress=progress)
            runs.append({"seed": seed, **result.summary()})
        arms.append(_summarise(arm, runs))
    record = {
        "study": name, "question": study.question, "paper": study.paper,
        "dataset": study.dataset, "train_examples": len(data.train_x),
        "test_examples": len(data.test_x), "seeds": seeds,
        "train_config": {k: v for k, v in dataclasses.asdict(base).items() if k != "method"},
        "arms": arms, "seconds": time.perf_counter() - start, "machine": machine_info(),
        "source": source_commit(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or "pvtune " + shlex.join(sys.argv[1:]),
    }
    write_study(record, output)
    return record


def _summarise(arm: Arm, runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs]
    out = {"label": arm.label, **dataclasses.asdict(arm), "runs": runs,
           "accuracy_mean": statistics.mean(accs),
           "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
           "bits_per_param": runs[0]["bits_per_param"],
           "seconds_per_run": statistics.mean(r["seconds"] for r in runs)}
    history = [r["history"] for r in runs]
    if "flips" in history[0][0]:
        out["flips_total_mean"] = statistics.mean(sum(h["flips"] for h in hist)
                                                  for hist in history)
        out["sad_total_mean"] = statistics.mean(sum(h["sad"] for h in hist) for hist in history)
        reste = [h[-1]["reste"] for h in history if h[-1].get("reste")]
        if reste:
            out["estimating_error_mean"] = statistics.mean(
                sum(v["estimating_error"] for v in r.values()) for r in reste)
            out["gradient_stability_mean"] = statistics.mean(
                sum(v["gradient_stability"] for v in r.values()) for r in reste)
    return out


def write_study(record: dict[str, Any], output: Path) -> None:
    """Write the record as JSON, a markdown table and a PNG of test accuracy per epoch."""
    output.mkdir(parents=True, exist_ok=True)
    stem = output / f"study_{record['study']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    headers = ["arm", "bits/weight", "test accuracy (mean ± std)", "flips (sum of steps)",
               "SAD", "est. error", "grad. stability", "s/run"]
    rows = []
    for a in record["arms"]:
        rows.append([a["label"], f"{a['bits_per_param']:.3g}",
                     f"{100 * a['accuracy_mean']:.2f} ± {100 * a['accuracy_std']:.2f}",
                     _fmt(a.get("flips_total_mean")), _fmt(a.get("sad_total_mean")),
                     _fmt(a.get("estimating_error_mean")), _fmt(a.get("gradient_stability_mean")),
                     f"{a['seconds_per_run']:.0f}"])
    m = record["machine"]
    cfg = record["train_config"]
    md = [f"# Study: {record['study']}", "", record["question"], "",
          format_table(headers, rows), "",
          f"{record['dataset']}: {record['train_examples']} training and "
          f"{record['test_examples']} test images; {record['seeds']} seeds per arm; "
          f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam lr {cfg['lr']} (cosine), "
          f"{_network(cfg)}, first and last layers full precision. Accuracy of "
          "the frozen model (codes), as saved. Flips: entries of the discrete state that "
          "changed, summed over steps; SAD: the same for N:M masks; estimating error and "
          "gradient stability: ReSTE's indicators at the last step, summed over layers.", "",
          *(["The peer keeps its weights dense (fp32, the pruned ones zero): its bits/weight "
             "is what it stores; pvtune's 2:4 layers store 8.75.", ""]
            if any(a.get("peer") for a in record["arms"]) else []),
          f"Paper setting and claim: {record['paper']}", "",
          f"Reproduce: `{record['command']}`", "",
          f"Measured at commit {record['source']['commit']}"
          f"{'+dirty' if record['source']['dirty'] else ''}, {record['utc']}, in "
          f"{record['seconds'] / 60:.1f} min; load average "
          f"{m['loadavg_1m']}/{m['loadavg_5m']}/{m['loadavg_15m']}, torch {m['torch']}, "
          f"{m['torch_threads']} threads, {m['cpu_count']} CPUs."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    _plot(record, stem.with_suffix(".png"))


def _network(cfg: dict[str, Any]) -> str:
    if cfg.get("arch") == "mlp":
        h = cfg["hidden"]
        return f"MLP (input)-{h}-{h}-{h}-(classes)"
    return f"SmallCNN width {cfg['width']}"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in record["arms"]:
        curves = [[h["test_accuracy"] for h in r["history"]] for r in a["runs"]]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker="o", label=a["label"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title(f"{record['study']} ({record['dataset']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["STUDIES", "Arm", "ImageData", "Study", "method_for", "representation_from_name",
           "run_study", "write_study"]
