"""VTAB-1k task names: the 19 canonical names, their class counts and the folder spellings seen in the wild.

Its own module because both the Parquet store (which finds 'cifar100' stored as 'cifar') and the VTAB folder
reader need it, and the reader needs the store: with the names here the imports run one way only.
"""

from __future__ import annotations

# Standard VTAB-1k class counts, under the folder names NOAH's get_vtab1k.py writes (the VPT/NOAH releases).
VTAB_NUM_CLASSES: dict[str, int] = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}

# Other folder spellings seen in the wild -> canonical name.
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "cifar-100": "cifar",
    "cifar_100": "cifar",
    "oxford_pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "oxford_flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist",
    "kitti_dist": "kitti",
    "kitti_distance": "kitti",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}


def canonical_task_name(name: str) -> str:
    """VTAB canonical name for a task or folder spelling ('cifar100' -> 'cifar'); unknown names pass through."""
    return VTAB_ALIASES.get(name, name)


def task_spellings(name: str) -> list[str]:
    """Every spelling that may name the same task: as given, canonical, then the known aliases (no repeats)."""
    canonical = canonical_task_name(name)
    return list(dict.fromkeys([name, canonical] + [a for a, c in VTAB_ALIASES.items() if c == canonical]))
