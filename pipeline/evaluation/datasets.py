"""Readers for evaluation data in the layouts people actually have on disk.

- MVTec AD as distributed: `<class>/test/<defect>/*.png`, masks `<class>/ground_truth/<defect>/<stem>_mask.png`,
  `good` without masks.
- VisA as distributed: `split_csv/1cls.csv` (object, split, label, image, mask) over `<class>/Data/Images|Masks`.
- A folder for a user's own line: `good/` and one folder per defect type, masks optional under
  `masks/<defect>/<same stem>.*`; or a root holding several such class folders.

Readers never stop at a bad file: a missing or mismatched mask, an orphan mask or an unreadable image
becomes a `DatasetIssue` naming the file, and the sample stays usable for image-level metrics (pixel
metrics skip anomalous images without a usable mask). Protocol resizing (`protocol_size`, `load_pair`)
lives here too so that images and masks are always resized the same way.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import AnoclipError, ImageError
from pipeline.inspection.imaging import DEFAULT_MAX_PIXELS, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
PROTOCOL_SIDE = 240
"""Protocol resolution: MVTec 240x240 (squash), VisA and folders 240 on the shorter side (keep aspect)."""
DATASETS = ("mvtec", "visa", "folder")
_FOLDER_MASKS = "masks"


class DatasetError(AnoclipError):
    """The dataset root cannot be read as the requested layout (not one bad file: those are issues)."""


@dataclass(frozen=True)
class Sample:
    """One test image with its ground truth; `mask_path` None means all-normal for good images."""

    image_path: Path
    mask_path: Path | None
    label: int
    """1 = anomalous, 0 = good."""
    defect: str
    cls: str

    @property
    def has_pixel_truth(self) -> bool:
        """Good images have an implicit empty mask; anomalous ones need a mask file."""
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class DatasetIssue:
    """A problem with one file, said so a person can fix it."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class DatasetIndex:
    """All samples of a dataset root in a fixed order, plus the problems found while reading it."""

    name: str
    root: Path
    samples: list[Sample]
    issues: list[DatasetIssue] = field(default_factory=list)
    keep_aspect: bool = False
    """Protocol resize: False = squash to 240x240 (MVTec), True = 240 on the shorter side (VisA, folder)."""

    @property
    def classes(self) -> list[str]:
        """Class names in the order they first appear."""
        return list(dict.fromkeys(s.cls for s in self.samples))

    def of_class(self, cls: str) -> list[Sample]:
        """The class's samples in dataset order (the official code's `shuffle=False` order)."""
        return [s for s in self.samples if s.cls == cls]

    def domain(self, cls: str) -> str:
        """Prompt domain: MVTec's five textures are 'texture'; every other class (all of VisA) 'object'."""
        return "texture" if self.name == "mvtec" and cls in MVTEC_TEXTURES else "object"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header only; None when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _check_pair(image: Path, mask: Path, root: Path, issues: list[DatasetIssue]) -> bool:
    """Mask is readable and the same size as its image; otherwise record why and return False."""
    isz, msz = _image_size(image), _image_size(mask)
    if isz is None:
        issues.append(DatasetIssue(_rel(image, root), "image cannot be read"))
        return False
    if msz is None:
        issues.append(DatasetIssue(_rel(mask, root), "mask cannot be read; pixel metrics skip this image"))
        return False
    if isz != msz:
        issues.append(
            DatasetIssue(
                _rel(mask, root),
                f"mask is {msz[0]}x{msz[1]} but its image is {isz[0]}x{isz[1]}; pixel metrics skip this image",
            )
        )
        return False
    return True


def _select(found: Sequence[str], wanted: Iterable[str] | None, root: Path) -> list[str]:
    if wanted is None:
        return list(found)
    wanted = list(wanted)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise DatasetError(
            f"class(es) {', '.join(unknown)} not found under {root} (found: {', '.join(found) or 'none'})"
        )
    return wanted


# --------------------------------------------------------------------------------------------------
# MVTec AD


def read_mvtec(root: str | os.PathLike[str], classes: Iterable[str] | None = None) -> DatasetIndex:
    """Index the MVTec AD test split: `good` is normal, every other defect folder anomalous."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"MVTec AD root {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not found:
        raise DatasetError(f"no MVTec AD class under {root} (expected <class>/test/<defect>/*.png)")
    samples: list[Sample] = []
    issues: list[DatasetIssue] = []
    for cls in _select(found, classes, root):
        test, gt = root / cls / "test", root / cls / "ground_truth"
        defects = sorted(p.name for p in test.iterdir() if p.is_dir())
        n_before = len(samples)
        for defect in defects:
            images = _images_in(test / defect)
            if defect == "good":
                samples += [Sample(p, None, 0, defect, cls) for p in images]
                continue
            used: set[Path] = set()
            for img in images:
                mask = gt / defect / f"{img.stem}_mask.png"
                if not mask.is_file():
                    problem = f"missing mask (expected {_rel(mask, root)}); pixel metrics skip it"
                    issues.append(DatasetIssue(_rel(img, root), problem))
                    samples.append(Sample(img, None, 1, defect, cls))
                    continue
                used.add(mask)
                ok = _check_pair(img, mask, root, issues)
                samples.append(Sample(img, mask if ok else None, 1, defect, cls))
            for mask in _images_in(gt / defect):
                if mask not in used:
                    issues.append(DatasetIssue(_rel(mask, root), "mask has no matching test image"))
        if gt.is_dir():
            for d in sorted(p for p in gt.iterdir() if p.is_dir() and p.name not in defects):
                issues.append(DatasetIssue(_rel(d, root), "ground-truth folder has no matching test folder"))
        if len(samples) == n_before:
            issues.append(DatasetIssue(_rel(test, root), "no test images"))
    return DatasetIndex("mvtec", root, samples, issues, keep_aspect=False)


# --------------------------------------------------------------------------------------------------
# VisA


VISA_SPLIT = Path("split_csv") / "1cls.csv"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(root: str | os.PathLike[str], classes: Iterable[str] | None = None, split: str = "test") -> DatasetIndex:
    """Index VisA's `split_csv/1cls.csv` rows of `split` (the protocol uses `test`)."""
    root = Path(root)
    csv_path = root / VISA_SPLIT
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} not found (expected the layout as distributed)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in _VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{csv_path} lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")
        rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, i + 2) for i, row in enumerate(reader)]
    found = list(dict.fromkeys(r["object"] for r, _ in rows if r["split"] == split))
    if not found:
        raise DatasetError(f"{csv_path} has no rows with split '{split}'")
    wanted = set(_select(found, classes, root))
    samples: list[Sample] = []
    issues: list[DatasetIssue] = []
    where = _rel(csv_path, root)
    for row, line_no in rows:
        if row["split"] != split or row["object"] not in wanted:
            continue
        kind = row["label"].lower()
        if kind not in ("normal", "anomaly"):
            issues.append(DatasetIssue(f"{where}:{line_no}", f"unknown label {row['label']!r}; row skipped"))
            continue
        image = root / row["image"]
        if not image.is_file():
            issues.append(DatasetIssue(row["image"] or f"{where}:{line_no}", "image listed in 1cls.csv not found"))
            continue
        label = int(kind == "anomaly")
        mask: Path | None = None
        if label:
            if not row["mask"]:
                problem = "anomalous image has no mask in 1cls.csv; pixel metrics skip it"
                issues.append(DatasetIssue(row["image"], problem))
            elif not (root / row["mask"]).is_file():
                issues.append(DatasetIssue(row["mask"], f"missing mask for {row['image']}; pixel metrics skip it"))
            elif _check_pair(image, root / row["mask"], root, issues):
                mask = root / row["mask"]
        samples.append(Sample(image, mask, label, kind, row["object"]))
    order = {c: i for i, c in enumerate(found)}
    samples.sort(key=lambda s: order[s.cls])  # stable: keeps the CSV order within a class
    return DatasetIndex("visa", root, samples, issues, keep_aspect=True)


# --------------------------------------------------------------------------------------------------
# generic folder


def _is_folder_class(d: Path) -> bool:
    return (d / "good").is_dir()


def read_folder(
    root: str | os.PathLike[str], classes: Iterable[str] | None = None, class_name: str | None = None
) -> DatasetIndex:
    """Index a user's folder: `good/`, `<defect>/` and optional `masks/<defect>/<stem>.<ext>`.

    If ROOT itself has `good/` it is one class (named `class_name` or ROOT's folder name); otherwise
    each sub-folder with a `good/` is a class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder root {root} is not a directory")
    if _is_folder_class(root):
        layout = {class_name or root.name: root}
    else:
        layout = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and _is_folder_class(d)}
    if not layout:
        raise DatasetError(f"no 'good' folder under {root} (expected ROOT/good/ or ROOT/<class>/good/)")
    samples: list[Sample] = []
    issues: list[DatasetIssue] = []
    for cls in _select(list(layout), classes, root):
        base = layout[cls]
        masks_dir = base / _FOLDER_MASKS
        defects = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("good", _FOLDER_MASKS))
        samples += [Sample(p, None, 0, "good", cls) for p in _images_in(base / "good")]
        for defect in defects:
            masks = {p.stem: p for p in _images_in(masks_dir / defect)}
            images = _images_in(base / defect)
            stems = {p.stem for p in images}
            for img in images:
                mask = masks.get(img.stem)
                if mask is not None and not _check_pair(img, mask, root, issues):
                    mask = None
                samples.append(Sample(img, mask, 1, defect, cls))
            if masks and len(stems & set(masks)) < len(stems):
                for img in images:
                    if img.stem not in masks:
                        issues.append(DatasetIssue(_rel(img, root), "no mask while others in its folder have one"))
            for stem, mask in masks.items():
                if stem not in stems:
                    issues.append(DatasetIssue(_rel(mask, root), "mask has no matching image"))
    return DatasetIndex("folder", root, samples, issues, keep_aspect=True)


def train_samples(index: DatasetIndex, cls: str) -> list[Sample]:
    """The class's normal training images (MVTec `train/good`, VisA's `train` rows), sorted; DatasetError if none.

    What `anoclip eval --memory train` builds its bank from; the test split is never used for that.
    """
    if index.name == "mvtec":
        images = _images_in(index.root / cls / "train" / "good")
        samples = [Sample(p, None, 0, "good", cls) for p in images]
    elif index.name == "visa":
        try:
            train = read_visa(index.root, [cls], split="train")
        except DatasetError:
            train = DatasetIndex("visa", index.root, [])
        samples = [s for s in train.samples if s.label == 0]
    else:
        raise DatasetError(f"the {index.name} layout has no training images; use --memory mutual or stream")
    if not samples:
        raise DatasetError(f"class {cls!r} has no normal training images under {index.root}")
    return samples


def read_dataset(
    name: str, root: str | os.PathLike[str], classes: Iterable[str] | None = None, class_name: str | None = None
) -> DatasetIndex:
    """Dispatch on the layout name: `mvtec`, `visa` or `folder`."""
    if name == "mvtec":
        return read_mvtec(root, classes)
    if name == "visa":
        return read_visa(root, classes)
    if name == "folder":
        return read_folder(root, classes, class_name)
    raise DatasetError(f"unknown dataset layout {name!r} (use one of {', '.join(DATASETS)})")


# --------------------------------------------------------------------------------------------------
# protocol resizing


def protocol_size(width: int, height: int, keep_aspect: bool, side: int = PROTOCOL_SIDE) -> tuple[int, int]:
    """(width, height) the metrics are computed at.

    Squash: side x side (MVTec). Keep aspect: the shorter side becomes `side` and the longer one
    `int(side * long / short)`, as torchvision's `Resize(side)` computes it (VisA: 240 x W').
    """
    if not keep_aspect:
        return side, side
    if width >= height:
        return int(side * width / height), side
    return side, int(side * height / width)


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased, PIL) resize of an RGB uint8 image to (width, height)."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ground-truth mask like its image: binarise (>0) to 0/255, bilinear, then keep > 0.5."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    if (m.shape[1], m.shape[0]) != size:
        m = np.asarray(Image.fromarray(m).resize(size, Image.BILINEAR))
    return m.astype(np.float32) / 255.0 > 0.5


def read_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB through the project's decoder; `ImageError` names the file if it cannot be read."""
    return load_image(path, max_pixels=max_pixels)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Ground-truth mask as bool (any non-zero pixel is defect: VisA masks are not 0/255)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


@dataclass
class LoadedSample:
    """A sample's image and mask at the protocol resolution."""

    sample: Sample
    image: np.ndarray
    """HxWx3 uint8 at the protocol resolution."""
    mask: np.ndarray | None
    """HxW bool at the protocol resolution; None when the image has no pixel ground truth."""
    original_size: tuple[int, int]


def load_pair(
    sample: Sample, keep_aspect: bool, side: int = PROTOCOL_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedSample:
    """Read and resize one sample's image and mask to the protocol resolution.

    Raises `ImageError` (naming the file) when the image or its mask cannot be decoded.
    """
    rgb = read_rgb(sample.image_path, max_pixels)
    h, w = rgb.shape[:2]
    size = protocol_size(w, h, keep_aspect, side)
    image = resize_image(rgb, size)
    mask: np.ndarray | None
    if sample.mask_path is not None:
        try:
            raw = read_mask(sample.mask_path)
        except (OSError, ValueError) as e:
            raise ImageError(f"{sample.mask_path}: mask cannot be decoded: {e}") from e
        mask = resize_mask(raw, size)
    elif sample.label == 0:
        mask = np.zeros((size[1], size[0]), dtype=bool)
    else:
        mask = None
    return LoadedSample(sample, image, mask, (w, h))
