"""Data: the embedded synthetic suite, the VTAB-1k folder reader, the Parquet store and torch datasets.

The torch-facing names (TaskDataset, load_split_tensors, ...) load lazily, so the prepare stage and its
worker processes never pay for importing torch/timm.
"""

from dynadapter.data.store import (
    SPLITS,
    DataError,
    TaskData,
    list_tasks,
    read_manifest,
    read_task,
    resolve_split,
    split_union,
    write_task,
)
from dynadapter.data.synthetic import (
    TASKS,
    GeneratedTask,
    generate_suite,
    generate_task,
    task_groups,
)
from dynadapter.data.vtab import (
    VTAB_NUM_CLASSES,
    BadLine,
    ImportReport,
    canonical_task_name,
    find_task_folder,
    import_vtab,
    read_vtab_task,
)

_LAZY = {"TaskDataset", "load_split_tensors", "load_split_images", "decode_images", "normalize"}


def __getattr__(name: str):
    if name in _LAZY:
        from dynadapter.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'dynadapter.data' has no attribute {name!r}")


__all__ = [
    "SPLITS",
    "TASKS",
    "task_groups",
    "VTAB_NUM_CLASSES",
    "BadLine",
    "DataError",
    "GeneratedTask",
    "ImportReport",
    "TaskData",
    "TaskDataset",
    "canonical_task_name",
    "decode_images",
    "find_task_folder",
    "generate_suite",
    "generate_task",
    "import_vtab",
    "list_tasks",
    "load_split_images",
    "load_split_tensors",
    "normalize",
    "read_manifest",
    "read_task",
    "read_vtab_task",
    "resolve_split",
    "split_union",
    "write_task",
]
