"""The tables of BENCHMARKS.md §1 and §2.1: the default pipeline's committed run, its recorded reruns (fresh clones,
a second seed, the test suite), issue 24's targets on both seeds, the backbone's pretraining and how it transfers,
and the components on the tasks the backbone never saw.

Read from `outputs/evaluate/metrics.json` (the committed `make repro`), `bench/results/pipeline_runs/*.json`
(`bench/record_run.py`), `weights/embedded_backbone.json` and the peers benchmark's ablation runs. Registered on
import (bench/tables.py imports this module).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from doctables import ROOT, Source, header, pt, read_json, row, seeds_and_mean, table

DEFAULT = Source("outputs/evaluate/metrics.json", "`make repro` (committed with `dvc.lock`)")
RUNS_DIR = "bench/results/pipeline_runs"
FRESH = Source(f"{RUNS_DIR}/fresh_clone_repro_w020.json", "`.venv/bin/python bench/record_run.py --name "
               "fresh_clone_repro_w020 --cwd <a fresh git clone, after its make test> -- bash -c "
               "'rm -rf outputs/tune models/checkpoints/tune && make repro'`")
SEED1 = Source(f"{RUNS_DIR}/heads_w020_seed1.json", "`.venv/bin/python bench/record_run.py --name heads_w020_seed1 "
               "--cwd <a fresh clone> -- bash -c 'source .venv/bin/activate && dvc exp run -S base.model.heads.width=0.2 "
               "-S base.seed=1'` (params.yaml's default since)")
RUNS = Source(f"{RUNS_DIR}/*.json", "`bench/record_run.py` (each file keeps its command, commit and output figures)")
BACKBONE = Source("weights/embedded_backbone.json", "`make backbone` (`python -m pipelines.pretrain --ship`)")
ABL_METHODS = ("full_rep_adapter,dyn_rep_adapter,abl_no_balanced_heads,abl_no_priority,abl_no_forward_sparsity,"
               "abl_no_backward_sparsity")
ABL_UNSEEN = tuple(Source(f"bench/results/abl_unseen_seed{s}/peers.json",
                          f"`.venv/bin/python bench/peers.py --tasks digits,glyphs,textures --methods {ABL_METHODS} "
                          f"--ablation-petl rep_adapter --best none --set base.seed={s} "
                          f"--out bench/results/abl_unseen_seed{s} --experiment ''`") for s in (0, 1))


def pretraining_factor(task: str) -> str:
    """The embedded backbone's pretraining factor that predicts the task's label ('none' for an unseen task)."""
    from dynadapter.data.synthetic import TASKS

    return TASKS[task].pretraining_factor or "none"


def acc_macs(acc: float, macs: float) -> str:
    return f"{acc:.4f} @ {macs:.3f}"


# ------------------------------------------------------------------------------------------ §1 the default run


def versus_full(r: dict) -> tuple[str, str, str]:
    """Dyn-Adapter's test accuracy @ MACs, full depth's, and the difference in points, of a metrics entry."""
    return (acc_macs(r["dyn_test_accuracy"], r["dyn_test_macs_fraction"]), f"{r['baseline_test_accuracy']:.4f}",
            pt(r["dyn_test_accuracy"] - r["baseline_test_accuracy"]))


@table("pipeline.default", DEFAULT)
def pipeline_default() -> str:
    """Each task of the committed run, then each group and the suite: Dyn-Adapter at budget 0.5 against full depth."""
    m = read_json(DEFAULT.path)
    lines = header("task", "pretraining factor", "Dyn-Adapter test acc @ MACs", "full depth", "Dyn − full, pt")
    for task, r in m["tasks"].items():
        lines.append(row(task, pretraining_factor(task), *versus_full(r)))
    groups = [(f"**{g}** ({len(r['tasks'])} tasks)", r) for g, r in m.get("groups", {}).items()]
    for label, r in groups + [(f"**suite** ({len(m['tasks'])} tasks)", m)]:
        lines.append(row(label, "", *versus_full(r)))
    return "\n".join(lines)


def evaluate_of(record: dict) -> dict:
    return record["outputs"]["evaluate"]


TARGET_RUNS = (("seed 0, committed run", lambda: read_json(DEFAULT.path)),
               ("seed 0, fresh clone", lambda: evaluate_of(read_json(FRESH.path))),
               ("seed 1", lambda: evaluate_of(read_json(SEED1.path))))


def targets_of(m: dict) -> list[tuple[str, bool]]:
    """Issue 24's targets on one run's evaluate metrics: (measured figure, met?) in TARGETS' order."""
    unseen, probe = m["groups"]["unseen"], m["transfer"]["groups"]["unseen"]
    drop_u = unseen["dyn_test_accuracy"] - unseen["baseline_test_accuracy"]
    drop_s = m["dyn_test_accuracy"] - m["baseline_test_accuracy"]
    reference = max(probe["random_init_probe_val"], probe["pixel_probe_val"])
    return [
        (f"{probe['margin']:.3f} ({probe['probe_val']:.3f} vs {reference:.3f})", probe["margin"] >= 0.10),
        (f"{unseen['baseline_test_accuracy']:.4f}", unseen["baseline_test_accuracy"] >= 0.75),
        (f"{pt(drop_u)} pt at {unseen['dyn_test_macs_fraction']:.3f}",
         drop_u >= -0.005 and unseen["dyn_test_macs_fraction"] <= 0.50),
        (f"{m['baseline_test_accuracy']:.4f}", m["baseline_test_accuracy"] >= 0.80),
        (f"{pt(drop_s)} pt at {m['dyn_test_macs_fraction']:.3f}",
         drop_s >= -0.005 and m["dyn_test_macs_fraction"] <= 0.50),
    ]


TARGETS = ("unseen tasks: probe margin over random init and pixels ≥ 0.10",
           "unseen tasks: full-depth PETL test acc ≥ 0.75",
           "unseen tasks: Dyn-Adapter at budget 0.5 within 0.5 pt of full depth, MACs ≤ 0.50",
           "suite: full-depth PETL test acc ≥ 0.80",
           "suite: Dyn-Adapter at budget 0.5 within 0.5 pt of full depth, MACs ≤ 0.50")


@table("pipeline.targets", DEFAULT, FRESH, SEED1)
def pipeline_targets() -> str:
    """Issue 24's done-when figures on each run: the committed one, its fresh-clone rerun and the second seed."""
    runs = [(name, targets_of(get())) for name, get in TARGET_RUNS]
    lines = header("target (issue 24)", *(name for name, _ in runs), "met on every run?")
    for i, target in enumerate(TARGETS):
        cells = [figures[i] for _, figures in runs]
        lines.append(row(target, *(f for f, _ in cells), "yes" if all(ok for _, ok in cells) else "**no**"))
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    """Seconds as min:s, rounded to the second (1319.8 s is 22:00, never 21:60)."""
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


@table("pipeline.runs", RUNS)
def pipeline_runs() -> str:
    """Every recorded run: what ran where, how long, and the figures it left."""
    records = sorted((read_json(str(p.relative_to(ROOT))) for p in (ROOT / RUNS_DIR).glob("*.json")),
                     key=lambda r: r["started"])
    lines = header("record", "commit", "command", "exit", "wall (min:s)", "tune s", "tests",
                   "Dyn-Adapter @ MACs / full depth", "unseen tasks: Dyn / full")
    for r in records:
        ev, tune = r["outputs"].get("evaluate"), r["outputs"].get("tune")
        suite = (f"{acc_macs(ev['dyn_test_accuracy'], ev['dyn_test_macs_fraction'])} / "
                 f"{ev['baseline_test_accuracy']:.4f}") if ev and r["pytest"] is None else ""
        unseen = ev["groups"]["unseen"] if ev and r["pytest"] is None and "groups" in ev else None
        lines.append(row(f"`{Path(r['name']).name}`", (r["commit"] or "")[:7], f"`{r['command']}`", r["exit_code"],
                         minutes(r["wall_seconds"]), f"{tune['seconds']:.0f}" if tune and r["pytest"] is None else "",
                         (f"{r['pytest']['summary']} in {minutes(r['pytest']['seconds'])}") if r["pytest"] else "",
                         suite, f"{unseen['dyn_test_accuracy']:.4f} / {unseen['baseline_test_accuracy']:.4f}"
                         if unseen else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ §10 the heads' width

HEADS_RUNS = {0.25: ("fresh_clone_repro", "seed1"), 0.2: ("heads_w020_seed0", "heads_w020_seed1")}
HEADS = tuple(Source(f"{RUNS_DIR}/{name}.json", RUNS.command) for names in HEADS_RUNS.values() for name in names)


@table("pipeline.heads_width", *HEADS)
def pipeline_heads_width() -> str:
    """The default pipeline at heads.width 0.25 and 0.2, seeds 0 and 1: val decides, test is read afterwards."""
    lines = header("heads.width", "trainable % (suite mean)", "Dyn-Adapter val acc at 0.5, seed 0 / 1 (mean)",
                   "test acc at 0.5, seed 0 / 1 (mean)", "full depth test acc, seed 0 / 1",
                   "Dyn-Adapter − full depth, seed 0 / 1")
    for width, names in HEADS_RUNS.items():
        runs = [evaluate_of(read_json(f"{RUNS_DIR}/{name}.json")) for name in names]
        lines.append(row(width, f"{100 * runs[0]['trainable_params_fraction']:.2f}",
                         seeds_and_mean([r["dyn_val_accuracy"] for r in runs], "{:.4f}"),
                         seeds_and_mean([r["dyn_test_accuracy"] for r in runs], "{:.4f}"),
                         " / ".join(f"{r['baseline_test_accuracy']:.4f}" for r in runs),
                         " / ".join(f"{pt(r['dyn_test_accuracy'] - r['baseline_test_accuracy'])} pt" for r in runs)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ §2.1 the backbone


@table("backbone.upstream", BACKBONE)
def backbone_upstream() -> str:
    """The shipped backbone's upstream val accuracy per factor, after 4, 8 and all epochs of its pretraining."""
    b = read_json(BACKBONE.path)
    by_epoch = {h["epoch"]: h["val_factor_acc"] for h in b["history"]}
    epochs = [e for e in (4, 8) if e in by_epoch] + [b["epochs"]]
    lines = header("factor", "classes", *(f"upstream val acc, epoch {e}" for e in epochs))
    for f, k in b["factors"].items():
        lines.append(row(f, k, *(f"{by_epoch[e][f]:.3f}" for e in epochs)))
    lines.append(row("**mean**", "", *(f"{statistics.mean(by_epoch[e].values()):.3f}" for e in epochs)))
    return (f"{b['scenes']:,} scenes, {b['epochs']} epochs, seed {b['seed']}, {b['seconds'] / 60:.0f} min on the "
            "2-core CPU; val: its own 2,000 held-out scenes.\n\n" + "\n".join(lines))


@table("backbone.transfer", DEFAULT)
def backbone_transfer() -> str:
    """The committed run's linear probes (train -> val) per task, and each group's means and margin."""
    t = read_json(DEFAULT.path)["transfer"]
    lines = header("task", "pretraining factor", "probe, shipped backbone", "random init", "pixels", "margin")

    def margin(r: dict) -> float:
        return r["probe_val"] - max(r["random_init_probe_val"], r["pixel_probe_val"])

    for task, r in t["tasks"].items():
        lines.append(row(task, pretraining_factor(task), f"{r['probe_val']:.3f}", f"{r['random_init_probe_val']:.3f}",
                         f"{r['pixel_probe_val']:.3f}", f"{margin(r):.3f}"))
    for label, r in [(f"**{g}**", r) for g, r in t.get("groups", {}).items()] + [("**suite**", t)]:
        lines.append(row(label, "", f"{r['probe_val']:.3f}", f"{r['random_init_probe_val']:.3f}",
                         f"{r['pixel_probe_val']:.3f}", f"{r['margin']:.3f}"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ §1 components, unseen tasks

UNSEEN_COMPONENTS = {"abl_no_balanced_heads": "balanced heads (plain LN + Linear instead)",
                     "abl_no_priority": "adaptive prioritization (flat weights)",
                     "abl_no_forward_sparsity": "forward sparsity",
                     "abl_no_backward_sparsity": "backward sparsity"}


def spread(values: list[float]) -> str:
    """Seed 0 / seed 1 in points, and their mean."""
    return f"{' / '.join(pt(v) for v in values)} (mean {pt(statistics.mean(values))})"


@table("unseen.components", *ABL_UNSEEN)
def unseen_components() -> str:
    """On the three unseen tasks, two seeds: Dyn-Adapter with every component against full depth, and each
    component's effect (with minus without), on val and on test at budget 0.5."""
    runs = [{r["method"]: r for r in read_json(s.path)["summary"]} for s in ABL_UNSEEN]
    dyn = [r["dyn_rep_adapter"] for r in runs]
    lines = header("", "test acc at 0.5, seed 0 / 1", "val acc at 0.5, seed 0 / 1",
                   "effect on val, pt: seed 0 / 1", "effect on test, pt: seed 0 / 1")
    macs = " / ".join(f"{d['macs_fraction']:.3f}" for d in dyn)
    lines.append(row(f"Dyn-Adapter, every component (MACs {macs})",
                     " / ".join(f"{d['test_accuracy']:.4f}" for d in dyn),
                     " / ".join(f"{d['val_accuracy']:.3f}" for d in dyn), "", ""))
    full = [r["full_rep_adapter"] for r in runs]
    lines.append(row("full-depth Rep-Adapter (Dyn − full below)",
                     " / ".join(f"{f['test_accuracy']:.4f}" for f in full),
                     " / ".join(f"{f['val_accuracy']:.3f}" for f in full),
                     spread([d["val_accuracy"] - f["val_accuracy"] for d, f in zip(dyn, full)]),
                     spread([d["test_accuracy"] - f["test_accuracy"] for d, f in zip(dyn, full)])))
    for name, label in UNSEEN_COMPONENTS.items():
        abl = [r[name] for r in runs]
        lines.append(row(f"without {label}", " / ".join(f"{a['test_accuracy']:.4f}" for a in abl),
                         " / ".join(f"{a['val_accuracy']:.3f}" for a in abl),
                         spread([d["val_accuracy"] - a["val_accuracy"] for d, a in zip(dyn, abl)]),
                         spread([d["test_accuracy"] - a["test_accuracy"] for d, a in zip(dyn, abl)])))
    return "\n".join(lines)
