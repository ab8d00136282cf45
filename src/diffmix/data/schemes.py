"""Class schemes: how raw dataset class ids merge into the K classes diffmix works with.

A scheme maps raw ids to merged ids 1..K (0 stays background) and names its rare ("minor")
class, the one DiffMix balancing creates more of (spec 5, 6a: class 1 in CoNSeP and GLySAC).
A merge is applied exactly once: datasets diffmix writes record `merged: true` in
`dataset.json`, and `merge_type_map` refuses to run on already-merged data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from diffmix.errors import ClassSchemeError, describe_yaml_error


@dataclass(frozen=True)
class ClassScheme:
    """A merged class list plus the raw -> merged mapping that produces it.

    `classes` maps merged id (1..K) to a name; `raw_to_merged` maps every raw id the source
    dataset may contain to a merged id (an identity mapping for already-merged sources).
    """

    name: str
    classes: Mapping[int, str]
    raw_to_merged: Mapping[int, int]
    minor_class: int
    description: str = ""
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = sorted(self.classes)
        if ids != list(range(1, len(ids) + 1)):
            raise ClassSchemeError(
                f"scheme {self.name!r}: merged class ids must be 1..K, got {ids}"
            )
        if self.minor_class not in self.classes:
            raise ClassSchemeError(
                f"scheme {self.name!r}: minor class {self.minor_class} is not one of {ids}"
            )
        bad = {r: m for r, m in self.raw_to_merged.items() if m not in self.classes or r <= 0}
        if bad:
            raise ClassSchemeError(
                f"scheme {self.name!r}: mapping entries {bad} point outside classes {ids} "
                "or use a raw id <= 0"
            )
        size = max(self.raw_to_merged, default=0) + 1
        lut = np.full(size, -1, dtype=np.int64)
        lut[0] = 0
        for raw, merged in self.raw_to_merged.items():
            lut[raw] = merged
        object.__setattr__(self, "_lut", lut)

    @property
    def num_classes(self) -> int:
        """K, the number of nucleus classes (background not counted)."""
        return len(self.classes)

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Merged class ids 1..K, the class list the metrics report F1 for."""
        return tuple(range(1, self.num_classes + 1))

    def class_name(self, class_id: int) -> str:
        return "background" if class_id == 0 else self.classes[class_id]

    def merge_type_map(self, type_map: np.ndarray, where: str = "") -> np.ndarray:
        """Map raw class ids to merged ids (int32); unknown raw ids raise, naming `where`."""
        raw = np.asarray(type_map)
        if raw.size and (raw.min() < 0 or raw.max() >= len(self._lut)):
            unknown = sorted(set(np.unique(raw).tolist()) - set(range(len(self._lut))))
            raise ClassSchemeError(
                f"{where or 'type map'}: raw class ids {unknown} are not in scheme "
                f"{self.name!r} (known: {sorted(self.raw_to_merged)})"
            )
        merged = self._lut[raw.astype(np.int64)]
        if merged.size and merged.min() < 0:
            unknown = sorted(np.unique(raw[merged < 0]).tolist())
            raise ClassSchemeError(
                f"{where or 'type map'}: raw class ids {unknown} are not in scheme "
                f"{self.name!r} (known: {sorted(self.raw_to_merged)})"
            )
        return merged.astype(np.int32)

    def to_json(self) -> dict[str, Any]:
        """The scheme as stored in `dataset.json` (merged class names, minor class)."""
        return {
            "name": self.name,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "raw_to_merged": {str(k): v for k, v in sorted(self.raw_to_merged.items())},
            "minor_class": self.minor_class,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "dataset.json") -> "ClassScheme":
        try:
            return cls(
                name=str(obj["name"]),
                classes={int(k): str(v) for k, v in obj["classes"].items()},
                raw_to_merged={int(k): int(v) for k, v in obj["raw_to_merged"].items()},
                minor_class=int(obj["minor_class"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ClassSchemeError(f"{where}: malformed class scheme ({exc})") from None

    def merged(self) -> "ClassScheme":
        """The identity scheme over this scheme's merged classes (for already-merged data)."""
        return ClassScheme(
            name=self.name,
            classes=dict(self.classes),
            raw_to_merged={k: k for k in self.classes},
            minor_class=self.minor_class,
            description=self.description,
        )


CONSEP = ClassScheme(
    name="consep",
    classes={1: "miscellaneous", 2: "inflammatory", 3: "epithelial", 4: "spindle"},
    # hovernet_notes 1: {3,4} -> 3 epithelial, {5,6,7} -> 4 spindle-shaped.
    raw_to_merged={1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4},
    minor_class=1,
    description="CoNSeP 7 raw classes merged to 4 (HoVer-Net dataset.py)",
)

GLYSAC = ClassScheme(
    name="glysac",
    classes={1: "miscellaneous", 2: "lymphocyte", 3: "epithelial"},
    # SONNET extract_patches.py: {1,2,9,10} other, {4,5,6,7} lymphocyte, {3,8} epithelial.
    raw_to_merged={1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3},
    minor_class=1,
    description="GLySAC raw classes merged to 3 (SONNET)",
)

PANNUKE = ClassScheme(
    name="pannuke",
    classes={1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"},
    raw_to_merged={1: 1, 2: 2, 3: 3, 4: 4, 5: 5},
    # "dead" is the rarest PanNuke class (about 2% of nuclei).
    minor_class=4,
    description="PanNuke 5 classes, no merge (mask channels 0..4)",
)

#: Contour colour (RGB) of each class id in `seg infer` overlays and in GeoJSON exports (QuPath
#: shows its detections in them); id 0 (no class) is white. Ids beyond the list wrap around.
CONTOUR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (255, 0, 0),
    (0, 200, 0),
    (0, 80, 255),
    (255, 200, 0),
    (255, 0, 255),
    (0, 230, 230),
    (255, 128, 0),
    (128, 0, 255),
)

BUILTIN_SCHEMES: dict[str, ClassScheme] = {s.name: s for s in (CONSEP, GLYSAC, PANNUKE)}


#: The keys of a scheme YAML; any other key is a typo (e.g. `minor_clas`), not ignored.
SCHEME_YAML_KEYS = ("name", "classes", "merge", "minor_class", "description")


def scheme_from_yaml(path: str | Path) -> ClassScheme:
    """Read a user scheme: `name`, `classes: {id: name}`, `merge: {merged_id: [raw ids]}`
    (optional: identity), `minor_class`, `description` (optional). Other keys are an error."""
    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClassSchemeError(f"{path}: cannot read class scheme ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ClassSchemeError(f"{path}: not a text file, so not a class scheme YAML") from None
    except yaml.YAMLError as exc:
        raise ClassSchemeError(f"{path}: not valid YAML at {describe_yaml_error(exc)}") from None
    if not isinstance(obj, dict):
        raise ClassSchemeError(f"{path}: a class scheme must be a mapping with keys {list(SCHEME_YAML_KEYS)}")
    unknown = sorted(str(k) for k in obj if k not in SCHEME_YAML_KEYS)
    if unknown:
        raise ClassSchemeError(f"{path}: unknown key(s) {unknown} in class scheme; allowed: {list(SCHEME_YAML_KEYS)}")
    if "classes" not in obj or "minor_class" not in obj:
        raise ClassSchemeError(f"{path}: a scheme needs 'classes' and 'minor_class' keys")
    try:
        classes = {int(k): str(v) for k, v in obj["classes"].items()}
        merge = obj.get("merge") or {k: [k] for k in classes}
        raw_to_merged: dict[int, int] = {}
        for merged_id, raws in merge.items():
            for raw in raws if isinstance(raws, (list, tuple)) else [raws]:
                if int(raw) in raw_to_merged:
                    raise ClassSchemeError(f"{path}: raw class {raw} is merged twice")
                raw_to_merged[int(raw)] = int(merged_id)
        return ClassScheme(
            name=str(obj.get("name", path.stem)),
            classes=classes,
            raw_to_merged=raw_to_merged,
            minor_class=int(obj["minor_class"]),
            description=str(obj.get("description") or ""),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ClassSchemeError(f"{path}: malformed class scheme ({exc})") from None


def get_scheme(scheme: str | Path | ClassScheme) -> ClassScheme:
    """A built-in scheme by name (`consep`, `glysac`, `pannuke`), or a YAML file path."""
    if isinstance(scheme, ClassScheme):
        return scheme
    key = str(scheme)
    if key.lower() in BUILTIN_SCHEMES:
        return BUILTIN_SCHEMES[key.lower()]
    if key.endswith((".yaml", ".yml")):
        return scheme_from_yaml(key)
    raise ClassSchemeError(
        f"unknown class scheme {key!r}: use one of {sorted(BUILTIN_SCHEMES)} or a YAML file"
    )
