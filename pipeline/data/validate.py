"""
Validate LVIS v1 / COCO instance annotation files, and every image they name, before any training.

The first problem found raises :class:`DataError` whose one-line message names the file, the record
(``annotations[17] (id 42)``) and the field, e.g.::

    data/lvis/lvis_v1_val.json: annotations[3] (id 4): field 'bbox': box [150.0, 10.0, 40.0, 20.0]
    lies outside image 2 (160x128)

Every image is opened: its header must parse (a known image format), its size must be the record's
``width`` x ``height``, and its file must be complete (a PNG's chunks are read through its ``IEND``;
a JPEG must end with its end-of-image marker). Pixels are not decoded: a file damaged inside its
compressed data still gets one line from the training data loader (``pipeline.data.loader``). The images
are checked by a pool of processes, one per available core, with a progress bar (tqdm on a
terminal, else a line every 10 % for large sets). What passed is cached (JSON, keyed on each file's
path, size and modification time): a second validation of unchanged files only stats them.
"""
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# A box may overhang its image by this many pixels: LVIS and COCO boxes do, from float rounding.
BOX_TOLERANCE = 1.0
# Images checked per task of the process pool, and the fewest images worth starting a pool for.
CHUNK = 256
MIN_PARALLEL = 512
# Without a terminal, progress lines are printed from this many images to check on.
PLAIN_PROGRESS_MIN = 5000
# Bump when the checks change, so older cache entries are not trusted.
CACHE_VERSION = 1


class DataError(ValueError):
    """A malformed dataset file; the message is one line naming file, record and field."""


def _where(path: Path, section: str, index: int, record) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: {section}[{index}]" + (f" (id {rid})" if rid is not None else "")


def _require(path: Path, section: str, index: int, record, fields) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{_where(path, section, index, record)}: not an object")
    for field in fields:
        if field not in record:
            raise DataError(f"{_where(path, section, index, record)}: missing field '{field}'")


def check_image(file: str, width, height) -> Optional[str]:
    """What is wrong with the image ``file`` whose record says ``width`` x ``height`` (None: nothing)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            fmt, size = im.format, im.size
            orientation = im.getexif().get(0x0112, 1) if fmt == "JPEG" else 1
            if fmt == "PNG":
                im.verify()  # reads every chunk and its CRC through IEND, decoding nothing
    except FileNotFoundError:
        return f"image file {file} not found"
    except UnidentifiedImageError:
        return f"image file {file} is not an image (no known image header)"
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises SyntaxError for a broken PNG chunk
        return f"image file {file} is damaged or truncated ({e})"
    if fmt == "JPEG":
        with open(file, "rb") as f:
            f.seek(max(0, os.path.getsize(file) - 4096))
            if b"\xff\xd9" not in f.read():
                return f"image file {file} is truncated (no JPEG end-of-image marker)"
    # detectron2's read_image applies the EXIF orientation: 90-degree turns swap the sides.
    expected = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if size != expected:
        return f"image file {file} is {size[0]}x{size[1]}, the record says {width}x{height}"
    return None


def _check_chunk(items: List[Tuple[int, str, float, float]]) -> List[Tuple[int, str]]:
    """(index, problem) of each bad image of ``items`` = (index, file, width, height)."""
    out = []
    for index, file, width, height in items:
        problem = check_image(file, width, height)
        if problem:
            out.append((index, problem))
    return out


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress(total: int, desc: str):
    """An object with update(n) and close(): a tqdm bar on a terminal (when tqdm is installed); else,
    for ``PLAIN_PROGRESS_MIN`` images or more, a line every 10 %; else nothing (an error stays the
    only line a small dataset prints)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=1.0, leave=False)
        except ImportError:
            pass
    shown_from = PLAIN_PROGRESS_MIN

    class Plain:
        done, shown = 0, -1

        def update(self, n):
            self.done += n
            tenth = self.done * 10 // max(total, 1)
            if total >= shown_from and tenth != self.shown:
                self.shown = tenth
                print(f"{desc}: {self.done}/{total} images", file=sys.stderr, flush=True)

        def close(self):
            pass

    return Plain()


def _stat(file: str) -> Optional[List[int]]:
    try:
        st = os.stat(file)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_file(cache_dir: Path, path: Path) -> Path:
    return Path(cache_dir) / f"validated-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}.json"


def _read_cache(cache_dir: Optional[Path], path: Path) -> dict:
    if cache_dir is None:
        return {}
    try:
        cache = json.loads(_cache_file(cache_dir, path).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) and cache.get("version") == CACHE_VERSION else {}


def _write_cache(cache_dir: Optional[Path], path: Path, record: dict) -> None:
    if cache_dir is None:
        return
    from pipeline.atomic import write_text

    write_text(_cache_file(cache_dir, path), json.dumps({"version": CACHE_VERSION, **record}))


def _check_images(path: Path, images: List[dict], file_field: str, image_file: Callable[[dict], str],
                  cached: Dict[str, list]) -> Dict[str, list]:
    """Open every image not in ``cached`` (file -> [size, mtime_ns] when it passed) in a process
    pool; raise DataError on the first bad one (by index). Returns the new cache of files that passed."""
    todo, passed = [], {}
    for i, im in enumerate(images):
        file = image_file(im)
        stat = _stat(file)
        if stat is None:
            raise DataError(f"{_where(path, 'images', i, im)}: field '{file_field}': image file {file} not found")
        if cached.get(file) == stat:
            passed[file] = stat
        else:
            todo.append((i, file, im["width"], im["height"], stat))
    problems = []
    if todo:
        progress = _progress(len(todo), f"checking the images of {path.name}")
        items = [(i, f, w, h) for i, f, w, h, _ in todo]
        chunks = [items[k:k + CHUNK] for k in range(0, len(items), CHUNK)]
        workers = min(_workers(), len(chunks))
        try:
            if workers > 1 and len(items) >= MIN_PARALLEL:
                with ProcessPoolExecutor(workers) as pool:
                    for chunk, found in zip(chunks, pool.map(_check_chunk, chunks)):
                        problems += found
                        progress.update(len(chunk))
            else:
                for chunk in chunks:
                    problems += _check_chunk(chunk)
                    progress.update(len(chunk))
        finally:
            progress.close()
    bad = {i for i, _ in problems}
    passed.update({f: stat for i, f, _, _, stat in todo if i not in bad})
    if problems:
        index, problem = min(problems)
        raise DataError(f"{_where(path, 'images', index, images[index])}: field '{file_field}': {problem}")
    return passed


def validate_instances(path: Path, kind: str, image_file: Optional[Callable[[dict], str]] = None,
                       cache_dir: Optional[Path] = None) -> Dict[str, int]:
    """
    Check one LVIS (``kind='lvis'``) or COCO (``kind='coco'``) instances json. ``image_file``
    maps an image record to its path on disk (as detectron2's loader would); when given, every
    image is opened and checked (:func:`check_image`). With ``cache_dir``, the result is cached
    there: unchanged files (same size and modification time) are not checked again. Returns counts
    of images, annotations and categories.
    """
    if kind not in ("lvis", "coco"):
        raise ValueError(f"kind={kind!r}; allowed: lvis, coco")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    cache = _read_cache(cache_dir, path)
    if cache.get("json") == _stat(str(path)) and cache.get("kind") == kind and (image_file is None) == (
            cache.get("images") is None) and all(_stat(f) == s for f, s in (cache.get("images") or {}).items()):
        return cache["counts"]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing field '{key}' (a list)")

    if not data["images"]:
        raise DataError(f"{path}: field 'images': empty list (a split needs at least one image)")

    cat_fields = ("id", "name", "frequency") if kind == "lvis" else ("id", "name")
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        _require(path, "categories", i, cat, cat_fields)
        if cat["id"] in cat_ids:
            raise DataError(f"{_where(path, 'categories', i, cat)}: field 'id': duplicate id")
        if kind == "lvis" and (not isinstance(cat["id"], int) or not 1 <= cat["id"] <= len(data["categories"])):
            # detectron2's load_lvis_json turns category id k into class k - 1 of N classes.
            raise DataError(f"{_where(path, 'categories', i, cat)}: field 'id': {cat['id']!r} is outside "
                            f"1..{len(data['categories'])} (LVIS numbers its N categories 1..N)")
        if kind == "lvis" and cat["frequency"] not in ("r", "c", "f"):
            raise DataError(f"{_where(path, 'categories', i, cat)}: field 'frequency': "
                            f"{cat['frequency']!r} is not one of r, c, f")
        cat_ids.add(cat["id"])

    file_field = "coco_url" if kind == "lvis" else "file_name"
    image_fields = ("id", "width", "height", file_field)
    images = {}
    for i, im in enumerate(data["images"]):
        _require(path, "images", i, im, image_fields)
        if im["id"] in images:
            raise DataError(f"{_where(path, 'images', i, im)}: field 'id': duplicate id")
        for field in ("width", "height"):
            if not isinstance(im[field], (int, float)) or im[field] <= 0:
                raise DataError(f"{_where(path, 'images', i, im)}: field '{field}': "
                                f"{im[field]!r} is not a positive number")
        if kind == "lvis":
            for field in ("neg_category_ids", "not_exhaustive_category_ids"):
                unknown = [c for c in im.get(field, []) if c not in cat_ids]
                if unknown:
                    raise DataError(f"{_where(path, 'images', i, im)}: field '{field}': "
                                    f"unknown category id {unknown[0]}")
        images[im["id"]] = im

    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        _require(path, "annotations", i, ann, ("id", "image_id", "category_id", "bbox"))
        where = _where(path, "annotations", i, ann)
        if ann["id"] in ann_ids:
            raise DataError(f"{where}: field 'id': duplicate id")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise DataError(f"{where}: field 'image_id': unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise DataError(f"{where}: field 'category_id': unknown category id {ann['category_id']}")
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: field 'bbox': {bbox!r} is not [x, y, width, height]")
        x, y, w, h = bbox
        im = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: field 'bbox': box {bbox} has no area")
        if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > im["width"] + BOX_TOLERANCE
                or y + h > im["height"] + BOX_TOLERANCE):
            raise DataError(f"{where}: field 'bbox': box {bbox} lies outside image {im['id']} "
                            f"({im['width']}x{im['height']})")
        if kind == "lvis" and ann["category_id"] in im.get("neg_category_ids", []):
            raise DataError(f"{where}: field 'category_id': category {ann['category_id']} is "
                            f"listed in image {im['id']}'s neg_category_ids")
    counts = {"images": len(images), "annotations": len(ann_ids), "categories": len(cat_ids)}
    json_stat = _stat(str(path))  # before the slow part: a file edited meanwhile is checked again
    passed = None
    if image_file is not None:
        passed = _check_images(path, data["images"], file_field, image_file, cache.get("images") or {})
    _write_cache(cache_dir, path, {"json": json_stat, "kind": kind, "images": passed, "counts": counts})
    return counts
