"""Check a whole refer-layout data folder in one pass: ``vlaligner check-data ROOT --dataset D``.

Where :class:`~vlaligner.data.RefDataset` stops at the first problem of the split it loads,
:func:`check_data` goes through every split of a data set and lists every problem it finds,
each naming the file and the ids at fault, so that a user preparing RefCOCO finds every
problem in one pass, not one per crash:

- the files of the layout are present (``refs(<split_by>).p``, ``instances.json``, the
  image folder) and readable;
- every ref is well formed (:func:`~vlaligner.data.refer.ref_problems`), in a known split,
  with a unique ref id, and points to an annotation and an image that ``instances.json``
  has;
- every sentence is non-empty;
- every referenced image file is present, decodes, and has the size ``instances.json``
  gives (with ``decode=True``);
- every ref's mask decodes to the image size (with ``decode=True``); an empty mask is a
  warning, not a problem.

gRefCOCO (``dataset="grefcoco"``) is checked the same way in its own layout
(``grefcoco/grefs(<split_by>).p`` or ``.json``, ``grefcoco/instances.json``, ``images/train2014/``
or the RefCOCO image folder): each ref's ``ann_id`` is a list of annotations, all checked,
``[-1]`` meaning no target (counted in the ``no-target`` column).

Nothing is written; no file is changed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from .refer import (
    DATASET_SPLITS,
    GENERALIZED_DATASETS,
    IMAGE_SUBDIR,
    _GREF_IMAGE_SUBDIRS,
    _as_id,
    _unpickle_refs,
    annotation_problems,
    decode_segmentation,
    image_entry_problems,
    read_instances,
    ref_problems,
    sentence_text,
    target_ann_ids,
)

__all__ = ["DataProblem", "DataCheckReport", "check_data"]

PathLike = Union[str, "Path"]

#: Columns of the per-split table (gRefCOCO adds ``no-target``: refs that name no object).
COUNT_COLUMNS = ("refs", "sentences", "images", "problems")
GENERALIZED_COLUMNS = COUNT_COLUMNS + ("no-target",)


@dataclass
class DataProblem:
    """One problem (or warning) found by :func:`check_data`.

    Attributes:
        kind: short category, e.g. "missing image file", "empty sentence".
        path: the file at fault (or holding the entry at fault).
        detail: which entry and what is wrong (ref id, sentence id, annotation id...).
        split: the split of the ref concerned, or None for folder-wide problems.
    """

    kind: str
    path: str
    detail: str
    split: Optional[str] = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.path}: {self.detail}"


@dataclass
class DataCheckReport:
    """What :func:`check_data` found.

    Attributes:
        root, dataset, split_by: what was checked.
        counts: ``{split: {"refs", "sentences", "images", "problems"}}`` (non-empty
            sentences; distinct images).
        problems: everything that would break loading or training.
        warnings: things worth a look that do not break anything (an empty mask).
        checked_images, checked_masks: how many files / masks were decoded.
        total_images: distinct images the refs use, over all splits.
    """

    root: Path
    dataset: str
    split_by: str
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    problems: List[DataProblem] = field(default_factory=list)
    warnings: List[DataProblem] = field(default_factory=list)
    checked_images: int = 0
    checked_masks: int = 0
    total_images: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings allowed)."""
        return not self.problems

    def format(self, max_listed: int = 20) -> str:
        """The summary table, then the problems (first ``max_listed`` per kind) and warnings."""
        columns = GENERALIZED_COLUMNS if self.dataset in GENERALIZED_DATASETS else COUNT_COLUMNS
        lines = [f"check-data: {self.dataset} ({self.split_by}) in {self.root}"]
        header = f"{'split':<8}" + "".join(f"{c:>11}" for c in columns)
        lines += [header, "-" * len(header)]
        totals = Counter()
        for split, counts in self.counts.items():
            lines.append(f"{split:<8}" + "".join(f"{counts.get(c, 0):>11}" for c in columns))
            totals.update({c: counts.get(c, 0) for c in columns if c != "images"})
        folder_wide = sum(1 for p in self.problems if p.split is None)
        totals["problems"] += folder_wide
        if folder_wide:
            lines.append(f"{'(folder)':<8}" + "".join(
                f"{folder_wide if c == 'problems' else 0:>11}" for c in columns
            ))
        lines.append("-" * len(header))
        totals["images"] = self.total_images
        lines.append(f"{'total':<8}" + "".join(f"{totals[c]:>11}" for c in columns))
        lines.append(
            f"decoded {self.checked_images} image file(s) and {self.checked_masks} mask(s)"
        )
        for title, items in (("problem", self.problems), ("warning", self.warnings)):
            if not items:
                continue
            kinds = Counter(p.kind for p in items)
            lines.append(
                f"{len(items)} {title}(s): " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
            )
            shown: Counter = Counter()
            for item in items:
                shown[item.kind] += 1
                if shown[item.kind] <= max_listed:
                    lines.append(f"  {item}")
            for kind, n in kinds.items():
                if n > max_listed:
                    lines.append(f"  ... and {n - max_listed} more [{kind}]")
        lines.append("OK: no problems found" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def check_data(
    root: PathLike,
    dataset: str,
    split_by: Optional[str] = None,
    *,
    decode: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> DataCheckReport:
    """Check one data set of a refer-layout folder; return every problem found.

    Args:
        root: the data root (holding ``<dataset>/`` and ``images/mscoco/images/train2014/``).
        dataset: "refcoco", "refcoco+", "refcocog" or "grefcoco".
        split_by: "unc", "umd" or "google"; default the first of the data set (unc / umd).
        decode: also decode every referenced image file and every ref's mask (slower; off
            checks presence and structure only).
        progress: called with a short status line now and then (e.g. ``print``).

    Raises:
        ValueError: unknown ``dataset`` / ``split_by`` (a usage mistake, not a data problem).
    """
    if dataset not in DATASET_SPLITS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASET_SPLITS)}")
    if split_by is None:
        split_by = next(iter(DATASET_SPLITS[dataset]))
    if split_by not in DATASET_SPLITS[dataset]:
        raise ValueError(
            f"unknown split_by {split_by!r} for {dataset}; expected one of {list(DATASET_SPLITS[dataset])}"
        )
    root = Path(root)
    report = DataCheckReport(root=root, dataset=dataset, split_by=split_by)
    splits = DATASET_SPLITS[dataset][split_by]
    generalized = dataset in GENERALIZED_DATASETS
    for split in splits:
        report.counts[split] = {c: 0 for c in (GENERALIZED_COLUMNS if generalized else COUNT_COLUMNS)}

    def problem(kind: str, path: Any, detail: str, split: Optional[str] = None) -> None:
        report.problems.append(DataProblem(kind, str(path), detail, split))
        if split in report.counts:
            report.counts[split]["problems"] += 1

    if generalized:  # ReLA's grefer.py reads the pickle when there is one, else the JSON
        refs_file = root / dataset / f"grefs({split_by}).p"
        if not refs_file.is_file():
            refs_file = refs_file.with_suffix(".json")
        image_dir = next((root / d for d in _GREF_IMAGE_SUBDIRS if (root / d).is_dir()), root / _GREF_IMAGE_SUBDIRS[0])
    else:
        refs_file = root / dataset / f"refs({split_by}).p"
        image_dir = root / IMAGE_SUBDIR
    instances_file = root / dataset / "instances.json"
    if not root.is_dir():
        problem("missing folder", root, "the data root does not exist or is not a folder")
        return report
    for path, what in ((refs_file, "refs file"), (instances_file, "annotation file")):
        if not path.is_file():
            problem("missing file", path, f"the {what} of {dataset} ({split_by}) is missing")
    if not image_dir.is_dir():
        where = " (nor images/mscoco/images/train2014)" if generalized else ""
        problem("missing folder", image_dir, f"the COCO train2014 image folder is missing{where}")
    if not refs_file.is_file():
        return report

    try:
        if refs_file.suffix == ".json":
            import json

            refs = json.loads(refs_file.read_text(encoding="utf-8"))
        else:
            refs = _unpickle_refs(refs_file)
    except (ValueError, OSError) as err:
        problem("unreadable file", refs_file, str(err))
        return report
    if not isinstance(refs, list):
        problem("malformed file", refs_file, f"must hold a list of ref dicts, got {type(refs).__name__}")
        return report

    instances: Optional[dict] = None
    if instances_file.is_file():
        try:
            instances = read_instances(instances_file)
        except (ValueError, OSError) as err:
            problem("unreadable file", instances_file, str(err))
    anns = {int(_as_id(a["id"])): a for a in instances["annotations"]} if instances else {}
    images = {int(_as_id(im["id"])): im for im in instances["images"]} if instances else {}

    # ---------------------------------------------------------------- refs and sentences
    seen_refs: set = set()
    used_images: Dict[int, List[tuple]] = {}  # image id -> [(ref id, split)]
    good_refs: List[dict] = []
    split_images: Dict[str, set] = {}
    for index, ref in enumerate(refs):
        structural = ref_problems(ref, index)
        split = ref.get("split") if isinstance(ref, dict) and ref.get("split") in splits else None
        if structural:
            for text in structural:
                problem("malformed ref", refs_file, text, split)
            continue
        ref_id, image_id = (int(_as_id(ref[k])) for k in ("ref_id", "image_id"))
        if generalized:
            try:
                ann_ids = target_ann_ids(ref["ann_id"], where=f"ref {ref_id}")
            except ValueError as err:
                problem("malformed ref", refs_file, str(err), split)
                continue
        elif isinstance(ref["ann_id"], (list, tuple)):
            problem("malformed ref", refs_file, f"ref {ref_id} has a list ann_id {ref['ann_id']!r}: a list "
                    f"(several objects or none) is gRefCOCO's format; {dataset} refs name one annotation", split)
            continue
        else:
            ann_ids = [int(_as_id(ref["ann_id"]))]
        if split is None:
            problem("unknown split", refs_file, f"ref {ref_id} has split {ref['split']!r}, expected one of {list(splits)}")
            continue
        counts = report.counts[split]
        if ref_id in seen_refs:
            problem("duplicate ref id", refs_file, f"ref {ref_id} appears more than once", split)
        seen_refs.add(ref_id)
        counts["refs"] += 1
        if generalized and not ann_ids:
            counts["no-target"] += 1
        for sent in ref["sentences"]:
            if sentence_text(sent):
                counts["sentences"] += 1
            else:
                problem("empty sentence", refs_file, f"ref {ref_id} sentence {sent['sent_id']} is empty", split)
        if not ref["sentences"]:
            problem("no sentences", refs_file, f"ref {ref_id} has no sentences", split)
        if instances is None:
            continue
        ok = True
        for ann_id in ann_ids:
            ann = anns.get(ann_id)
            if ann is None:
                problem("missing annotation", refs_file,
                        f"ref {ref_id} points to annotation {ann_id}, which {instances_file.name} does not have", split)
                ok = False
            else:
                for text in annotation_problems(ann):
                    problem("malformed annotation", instances_file, f"annotation {ann_id} (of ref {ref_id}) {text}", split)
                    ok = False
        info = images.get(image_id)
        if info is None:
            problem("missing image entry", refs_file,
                    f"ref {ref_id} points to image {image_id}, which {instances_file.name} does not have", split)
            ok = False
        else:
            for text in image_entry_problems(info, image_dir):
                problem("malformed image entry", instances_file, f"image {image_id} (of ref {ref_id}) {text}", split)
                ok = False
            used_images.setdefault(image_id, []).append((ref_id, split))
            split_images.setdefault(split, set()).add(image_id)
        if ok:
            good_refs.append((ref, ann_ids))
    for split in splits:
        report.counts[split]["images"] = len(split_images.get(split, ()))
        if report.counts[split]["refs"] == 0:
            problem("empty split", refs_file, f"split {split!r} has no refs", split)

    report.total_images = len(used_images)

    # ---------------------------------------------------------------- image files
    bad_images: set = set()
    if image_dir.is_dir():
        for count, (image_id, users) in enumerate(sorted(used_images.items()), start=1):
            info = images[image_id]
            if image_entry_problems(info, image_dir):
                continue
            path = image_dir / info["file_name"]
            ref_ids = sorted({r for r, _ in users})
            who = f"image {image_id} of ref(s) {ref_ids[:5]}{'...' if len(ref_ids) > 5 else ''}"
            split = users[0][1]
            if not path.is_file():
                problem("missing image file", path, who, split)
                bad_images.add(image_id)
                continue
            if not decode:
                continue
            if progress and count % 500 == 0:
                progress(f"decoded {count} / {len(used_images)} images")
            try:
                from .transforms import load_image

                size = load_image(path).size
            except (ValueError, OSError) as err:
                problem("undecodable image", path, f"{who}: {err}", split)
                bad_images.add(image_id)
                continue
            report.checked_images += 1
            expected = (int(info["width"]), int(info["height"]))
            if size != expected:
                problem("image size mismatch", path,
                        f"{who} is {size[0]}x{size[1]} (w x h) but {instances_file.name} says "
                        f"{expected[0]}x{expected[1]}", split)

    # ---------------------------------------------------------------- masks
    if decode:
        for ref, ann_ids in good_refs:
            ref_id, image_id = (int(_as_id(ref[k])) for k in ("ref_id", "image_id"))
            info = images[image_id]
            covered = False
            for ann_id in ann_ids:
                try:
                    mask = decode_segmentation(anns[ann_id]["segmentation"], int(info["height"]), int(info["width"]))
                except ImportError:
                    raise
                except Exception as err:  # noqa: BLE001 - pycocotools raises many types
                    problem("undecodable mask", instances_file,
                            f"annotation {ann_id} (of ref {ref_id}): {type(err).__name__}: {err}", ref["split"])
                    covered = True  # reported as a problem already
                    continue
                report.checked_masks += 1
                covered = covered or bool(mask.any())
            if ann_ids and not covered:
                report.warnings.append(DataProblem(
                    "empty mask", str(instances_file),
                    f"annotation(s) {ann_ids} (of ref {ref_id}) cover no pixel", ref["split"],
                ))
    return report
