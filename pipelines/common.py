"""What every stage entry point shares: CLI (--params, --set), quiet offline environment, resolved config."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import sys
from pathlib import Path

from dynadapter.atomic import replacing, write_text_atomic  # noqa: F401 - the stages' one way to write a small output
from dynadapter.config import ConfigError, Params, load_params, save_resolved

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}


def quiet_offline_env() -> None:
    """No telemetry and no hub downloads, whoever launched us."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{stage}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Configuration: the `base` and `%s` sections of params.yaml; every key is documented in "
            "dynadapter/config.py. Override any key with --set, e.g. --set base.seed=1." % stage
        ),
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key (dotted path; value parsed as YAML); repeatable",
    )
    return parser


def load_stage_params(args: argparse.Namespace) -> Params:
    """Validate params before any work; exit 2 with the key path and value on a mistake."""
    quiet_offline_env()
    try:
        return load_params(args.params, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def save_stage_config(params: Params, stage: str, out_dir: str | Path) -> Path:
    """Write the resolved `base` + stage sections next to the stage's outputs."""
    path = Path(out_dir) / f"{stage}_config.yaml"
    save_resolved(params, ["base", stage], path)
    return path


@contextlib.contextmanager
def staged_output(target: str | Path):
    """A fresh folder beside the folder output `target`, which it replaces only when the block ends without
    error: an interrupted stage (Ctrl-C, a kill) never leaves a partly written output for DVC or a later
    stage to find; `target` is absent (DVC removes outputs before it runs a stage) or whole. The folder a
    killed run left behind is cleared by the next run."""
    from dynadapter.data.store import swap_into_place

    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV; the columns are every key seen, in first-seen order (rows may differ)."""
    keys = list(dict.fromkeys(k for row in rows for k in row)) or ["empty"]
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def epoch_printer(label: str, epochs: int):
    """on_epoch_end callback printing one line per epoch, so long stages show progress in `dvc repro` logs
    (tqdm bars only draw on a terminal)."""

    def report(epoch: int, metrics: dict) -> None:
        val = metrics.get("val_acc")
        val_txt = " val_acc " + "/".join(f"{a:.3f}" for a in val) if val else ""
        factors = metrics.get("val_factor_acc")  # the pretraining's per-factor val accuracy
        val_txt += " val " + " ".join(f"{k} {a:.3f}" for k, a in factors.items()) if factors else ""
        print(f"{label}: epoch {epoch}/{epochs} loss {metrics['train_loss']:.4f}{val_txt} "
              f"({metrics.get('seconds', 0.0):.1f}s)", flush=True)

    return report


@contextlib.contextmanager
def stage_tracking(params: Params, stage: str, sections: list[str] | None = None):
    """The pipeline's MLflow parent run, with this stage's resolved config logged on it.

    The tracking store is checked first: an unreachable server or unusable database stops the stage before
    any work (exit 3, the URI in the message) instead of failing after training. Stages of one pipeline run
    share a parent run (`dynadapter.tracking.pipeline_id_for`); a relative tracking URI is resolved against the
    project root: $DVC_ROOT, which DVC sets to the repository even when it runs a queued experiment in a
    temporary copy (so `dvc exp run --run-all` logs and registers in the project's store, not in a copy that
    is deleted), else the working directory."""
    from dynadapter.tracking import (TrackingUnavailableError, check_tracking_server, pipeline_id_for,
                                     pipeline_run, resolve_tracking_uri)

    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    uri = resolve_tracking_uri(params.base.mlflow.tracking_uri, root)
    try:
        check_tracking_server(uri)
    except TrackingUnavailableError as err:
        print(f"error: base.mlflow.tracking_uri: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    with pipeline_run(uri, params.base.mlflow.experiment, pipeline_id_for(params, root), stage=stage,
                      config=params, sections=sections or ["base", stage]) as parent:
        yield parent


@contextlib.contextmanager
def tracked_task(parent, task: str, variant: str, params: dict | None = None, *, stage: str):
    """The nested MLflow run of one task and model variant of `stage` (None when there is no parent run)."""
    if parent is None:
        yield None
        return
    from dynadapter.tracking import task_run

    with task_run(parent, task, stage=stage, params=params, tags={"dynadapter.variant": variant},
                  run_name=f"{stage}-{task}-{variant}") as run:
        yield run
