"""Tiny multi-exit ViTs and small utilities shared by the model and inference tests; a temporary git + DVC
copy of the project for the `dvc repro` tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynadapter.config import BackboneConfig, HeadsConfig, ModelConfig, PetlConfig, SparsityConfig
from dynadapter.models import DynAdapterViT, build_model
from dynadapter.models.petl import PetlModule

# 16x16 images, 8x8 patches: 4 patches + cls = 5 tokens; a forward pass is well under a millisecond.
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2)
PETL_METHODS = ["adapter", "lora", "rep_adapter"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone_cfg(**overrides) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", overrides={**TINY, **overrides})


def tiny_model(
    method: str = "adapter",
    early_exit: bool = True,
    num_classes: int = 5,
    seed: int = 0,
    sparsity: SparsityConfig | None = None,
    exits: list[int] | None = None,
    heads: HeadsConfig | None = None,
    confidence: str = "max_softmax",
    **overrides,
) -> DynAdapterViT:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(
        petl=PetlConfig(method=method),
        early_exit=early_exit,
        exits=exits,
        heads=heads if heads is not None else HeadsConfig(),
        confidence=confidence,
    )
    return build_model(backbone_cfg(**overrides), model_cfg, num_classes=num_classes, sparsity=sparsity)


@torch.no_grad()
def randomize_petl(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> int:
    """Give every PETL branch non-zero weights (the up projections start at zero, an exact no-op)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, PetlModule):
            for p in m.branch_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


@torch.no_grad()
def sharpen_heads(model: DynAdapterViT, seed: int = 0, scale: float = 3.0) -> None:
    """Spread the exits' confidences (freshly initialised heads are all close to uniform)."""
    g = torch.Generator().manual_seed(seed)
    for head in model.heads:
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * scale / head.fc.in_features**0.5)


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------- a temporary git + DVC copy of the project

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
DVC_PATHS = {"data": "data/prepared", "models": "models", "outputs": "outputs"}


def project_env(cwd: Path) -> dict[str, str]:
    """The environment `dvc` and its stages run in: this venv first, no analytics, one thread per op."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=cwd, env=project_env(cwd), capture_output=True, text=True, timeout=600)


def git(args: list[str], cwd: Path) -> None:
    out = subprocess.run(["git", *args], cwd=cwd, env=project_env(cwd), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def dvc_project(root: Path, params: dict) -> Path:
    """A committed git + DVC repository in `root` holding the project's code and dvc.yaml, with `params` (paths
    replaced by the real params.yaml's relative ones, every other key at its default) as its params.yaml."""
    for name in ("dynadapter", "pipelines", "weights"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    from dynadapter.config import parse_params

    # every key written out, as in the project's own params.yaml: dvc.yaml names single keys (base.model, ...)
    # and DVC refuses a stage whose params key is missing from the file
    params = parse_params({**params, "base": {**params["base"], "paths": DVC_PATHS}}).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(["init", "-q"], root)
    init = dvc(["init", "-q"], root)
    assert init.returncode == 0, init.stderr
    git(["add", "-A"], root)
    git(["commit", "-qm", "project"], root)
    return root


class FailsOnce:
    """A mixin for task data (before the dataclass it extends) whose attribute `attr` fails on its `at`-th read
    in a process, and only for the first process of a test to get there (a marker file, claimed atomically):
    how the fault tests make one Ray Train worker die or raise mid-run. `fail()` says how. Pickled with its read
    count reset, so every worker counts its own reads."""

    attr: str = "train"
    at: int = 1

    def __init__(self, *args, marker: str):
        super().__init__(*args)
        self.marker, self.reads = marker, 0

    def __getstate__(self):
        return {**self.__dict__, "reads": 0}

    def fail(self) -> None:
        raise NotImplementedError

    def __getattribute__(self, name):
        if name == type(self).attr:
            self.reads += 1
            if self.reads == type(self).at:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    self.fail()
        return super().__getattribute__(name)


def load_bench(script: str):
    """bench/<script>.py as a module (bench/ is not a package), loaded once per session as bench_<script>."""
    name = f"bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]
