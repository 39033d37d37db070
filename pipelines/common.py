"""What every stage entry point shares: CLI (--params, --set), quiet offline environment, resolved config."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def epoch_printer(label: str, epochs: int):
    """on_epoch_end callback printing one line per epoch, so long stages show progress in `dvc repro` logs
    (tqdm bars only draw on a terminal)."""

    def report(epoch: int, metrics: dict) -> None:
        val = metrics.get("val_acc")
        val_txt = " val_acc " + "/".join(f"{a:.3f}" for a in val) if val else ""
        print(f"{label}: epoch {epoch}/{epochs} loss {metrics['train_loss']:.4f}{val_txt} "
              f"({metrics.get('seconds', 0.0):.1f}s)", flush=True)

    return report
