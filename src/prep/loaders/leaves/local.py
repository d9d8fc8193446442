"""`LocalDataset`: a folder of images plus a FluxFlow captions file, with the same exact-resume protocol.

The captions file holds one `name<TAB>caption` per line (UTF-8, with or without a BOM). Blank lines are
skipped, the caption is everything after the first TAB (so captions may hold TABs), and a line without a
TAB or naming a missing image is an error that gives `file:line`. Image names are paths relative to the
folder and may not leave it.

With aspect-ratio buckets every batch holds images of one bucket, each resized to cover the bucket's
size and cropped to it: the epoch's plan (samples shuffled, grouped by bucket, cut into global batches,
batches shuffled) is a pure function of (seed, epoch), computed once per epoch and indexed by the cursor.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prep.errors import PrepError
from prep.loaders import skips
from prep.loaders.base import (
    DEFAULT_MAX_SKIP_FRACTION,
    BatchDesc,
    Collate,
    SampleLeaf,
    Span,
    Transform,
    batches_per_epoch,
    counter_rng,
    resolve_global_batch,
)
from prep.loaders.io.decode import DecodeMode, Decoder, Parsed
from prep.loaders.io.images import decode_reason
from prep.loaders.io.sources import unreadable
from prep.loaders.skips import BadSample, OnError, Skip

_ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


def default_buckets(base: int = 512, step: int = 64) -> list[tuple[int, int]]:
    """(H, W) buckets of about base*base pixels for common aspect ratios, sides multiples of `step`."""
    out = []
    for a in _ASPECTS:
        h = max(step, round(base / math.sqrt(a) / step) * step)
        w = max(step, round(base * math.sqrt(a) / step) * step)
        out.append((h, w))
    return out


def nearest_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is closest to h:w in log space (ties go to the first)."""
    target = math.log(w / h)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


def parse_captions(text: str, where: str) -> list[tuple[int, str, str]]:
    """(line number, image name, caption) for each non-blank line of a FluxFlow captions file."""
    out = []
    for ln, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise PrepError(
                "line has no TAB between the image name and the caption",
                f"{where}:{ln}",
                "write each line as NAME<TAB>CAPTION",
            )
        name, caption = line.split("\t", 1)
        name = name.strip()
        if not name:
            raise PrepError(
                "line has an empty image name", f"{where}:{ln}", "write each line as NAME<TAB>CAPTION"
            )
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise PrepError(
                f"image name {name!r} leaves the image folder",
                f"{where}:{ln}",
                "use names relative to the image folder",
            )
        out.append((ln, name, caption.strip()))
    return out


def _image_size(path: Path, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError) as err:
        raise BadSample(f"cannot read image header: {decode_reason(err)}", where,
                        "replace or remove this image", reason="corrupt image") from None


class LocalDataset(SampleLeaf):
    """Images in a folder + `name<TAB>caption` lines, as batches of {'__key__', image_field, caption_field}.

    Args mirror `ShardDataset` (batch_size is per rank; decode, image_size, crop, transform, collate,
    drop_last, seed, shuffle). `buckets`: None (one size, needs `image_size` for tensor batches), True
    (default buckets around `image_size` or 512 pixels a side), or a list of (H, W) sizes. Keys are the
    image names (with `#LINE` appended when a name is listed more than once). `on_error` and
    `max_skip_fraction` as in `ShardDataset`; with buckets, an image whose header cannot be read is
    skipped when the dataset opens (`skipped_at_open`, counted in `DataLoader.stats()`).
    """

    def __init__(
        self,
        image_folder: str | os.PathLike[str],
        captions_file: str | os.PathLike[str],
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        decode: DecodeMode = "uint8",
        image_size: int | Sequence[int] | None = None,
        crop: str = "center",
        transform: Transform | None = None,
        collate: Collate | None = None,
        drop_last: bool = False,
        buckets: bool | Sequence[Sequence[int]] | None = None,
        image_field: str = "jpg",
        caption_field: str = "txt",
        global_batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: OnError = "skip",
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        skips.check_policy(on_error, max_skip_fraction, "LocalDataset")
        self.on_error: OnError = on_error
        self.max_skip_fraction = float(max_skip_fraction)
        self.skipped_at_open: list[Skip] = []  # images that could not be bucketed (on_error="skip")
        self.folder = Path(image_folder)
        self.captions_file = Path(captions_file)
        if not self.folder.is_dir():
            raise PrepError("image folder not found", str(self.folder), "check image_folder")
        try:
            data = self.captions_file.read_bytes()
        except FileNotFoundError:
            raise PrepError(
                "captions file not found", str(self.captions_file), "check captions_file"
            ) from None
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # as Windows editors save
        try:
            text = str(data[bom:], "utf-8")
        except UnicodeDecodeError as err:
            line = text_line_of(data, bom + err.start)
            raise PrepError(
                "captions file is not UTF-8", f"{self.captions_file}:{line}", "re-save the file as UTF-8"
            ) from None
        rows = parse_captions(text, str(self.captions_file))
        if not rows:
            raise PrepError(
                "captions file has no entries", str(self.captions_file), "add NAME<TAB>CAPTION lines"
            )
        missing = [(ln, n) for ln, n, _ in rows if not (self.folder / n).is_file()]
        if missing:
            ln, name = missing[0]
            more = f" ({len(missing) - 1} more lines name missing images)" if len(missing) > 1 else ""
            raise PrepError(
                f"image {name!r} is not in {self.folder}{more}",
                f"{self.captions_file}:{ln}",
                "add the image, fix the name, or remove the line",
            )
        bucket_list: list[tuple[int, int]] | None = None
        if buckets:
            if buckets is True:
                base = image_size if isinstance(image_size, int) else (max(image_size) if image_size else 512)
                bucket_list = default_buckets(int(base))
            else:
                bucket_list = [(int(b[0]), int(b[1])) for b in buckets]
            rows, bucket_ids = self._bucket_rows(rows, bucket_list)
        counts: dict[str, int] = {}
        for _, n, _ in rows:
            counts[n] = counts.get(n, 0) + 1
        self.lines = [ln for ln, _, _ in rows]
        self.names = [n for _, n, _ in rows]
        self.captions = [c for _, _, c in rows]
        self.keys = [n if counts[n] == 1 else f"{n}#{ln}" for ln, n, _ in rows]
        g, r, w = resolve_global_batch(batch_size, global_batch_size, rank, world_size)
        super().__init__(total=len(rows), global_batch=g, rank=r, world=w, drop_last=drop_last)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.transform = transform
        self.collate = collate
        self.image_field = image_field
        self.caption_field = caption_field
        self.buckets = bucket_list
        self.bucket_of: np.ndarray | None = None
        self._bucket_digest: str | None = None
        if bucket_list is not None:
            self.bucket_of = np.array(bucket_ids, dtype=np.int64)
            self._bucket_digest = hashlib.sha256(self.bucket_of.astype("<i8").tobytes()).hexdigest()[:16]
            self.decoders = [Decoder.make(decode, b, crop, None, self.seed, on_error) for b in bucket_list]
        else:
            self.decoders = [Decoder.make(decode, image_size, crop, None, self.seed, on_error)]
        self._perm: tuple[int, np.ndarray] | None = None
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _bucket_rows(
        self, rows: list[tuple[int, str, str]], bucket_list: list[tuple[int, int]]
    ) -> tuple[list[tuple[int, str, str]], list[int]]:
        """The rows whose image header reads, with their buckets; the others are skipped (recorded in
        `skipped_at_open`) or raised, as on_error says."""
        kept, ids = [], []
        for row in rows:
            ln, name, _ = row
            where = f"{self.folder / name} ({self.captions_file}:{ln})"
            try:
                size = _image_size(self.folder / name, where)
            except BadSample as err:
                if self.on_error == "raise":
                    raise
                self.skipped_at_open.append(Skip("", err.reason, name, where, err.what, err.fix or ""))
                continue
            kept.append(row)
            ids.append(nearest_bucket(*size, bucket_list))
        bad = len(rows) - len(kept)
        if bad > self.max_skip_fraction * len(rows) or not kept:
            raise PrepError(
                f"{bad} of {len(rows)} images cannot be read, more than max_skip_fraction="
                f"{self.max_skip_fraction}; the first: {self.skipped_at_open[0].message}",
                self.skipped_at_open[0].where,
                "replace or remove the damaged images, or raise max_skip_fraction",
            )
        return kept, ids

    def __repr__(self) -> str:
        return (
            f"LocalDataset({self.folder}, {self.total} images, global_batch={self.global_batch}, "
            f"buckets={len(self.buckets) if self.buckets else None})"
        )

    # ------------------------------------------------------------------------------------ planning
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            perm = (
                counter_rng(self.seed, self.path, "order", epoch).permutation(self.total)
                if self.shuffle
                else np.arange(self.total)
            )
            self._perm = (epoch, perm.astype(np.int64))
        return self._perm[1]

    def refs(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(row, epoch, bucket) for epoch positions [start, stop) (bucket 0 without buckets)."""
        rows = self._permutation(epoch)[start:stop].tolist()
        return [(r, epoch, 0) for r in rows]

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches of rows, one bucket each: shuffled rows grouped by bucket, cut into global
        batches (the short tail of a bucket kept or dropped by drop_last), then the batches shuffled."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        assert self.bucket_of is not None and self.buckets is not None
        perm = self._permutation(epoch)
        batches: list[np.ndarray] = []
        g = self.global_batch
        for b in range(len(self.buckets)):
            rows = perm[self.bucket_of[perm] == b]
            stop = len(rows) - len(rows) % g if self.drop_last else len(rows)
            batches += [rows[i : i + g] for i in range(0, stop, g)]
        if self.shuffle and batches:
            order = counter_rng(self.seed, self.path, "batches", epoch).permutation(len(batches))
            batches = [batches[i] for i in order]
        self._plan = (epoch, batches)
        return batches

    def next_batch(self) -> BatchDesc:
        if self.buckets is None:
            return super().next_batch()
        plan = self.epoch_plan(self.epoch)
        if self.pos >= len(plan):
            raise self._end_epoch()
        rows = plan[self.pos]
        bucket = int(self.bucket_of[rows[0]])  # type: ignore[index]
        desc = BatchDesc(
            self.path,
            Span(self.epoch, 0, len(rows), batch=self.pos, leaf=self),
            {"epoch": self.epoch, "batch": self.pos, "bucket": self.buckets[bucket]},
        )
        self.pos += 1
        return desc

    def span_refs(self, span: Span, lo: int, hi: int) -> list[Any]:
        """(row, epoch, bucket) of items [lo, hi) of a planned batch (bucketed: one batch of the plan)."""
        if span.batch < 0:
            return super().span_refs(span, lo, hi)
        rows = self.epoch_plan(span.epoch)[span.batch]
        bucket = int(self.bucket_of[rows[0]])  # type: ignore[index]
        return [(r, span.epoch, bucket) for r in rows[lo:hi].tolist()]

    def take(self, n: int) -> tuple[Span, bool]:
        if self.buckets is not None:
            raise PrepError(
                "a bucketed LocalDataset cannot be mixed inside a batch (batches hold one bucket)",
                self.path or "LocalDataset",
                "blend whole batches instead, or drop buckets",
            )
        return super().take(n)

    def batches_per_epoch(self) -> int:
        if self.buckets is None:
            return super().batches_per_epoch()
        sizes = np.bincount(self.bucket_of, minlength=len(self.buckets))  # type: ignore[arg-type]
        return sum(batches_per_epoch(int(s), self.global_batch, self.drop_last) for s in sizes)

    @property
    def dropped_per_epoch(self) -> int:
        if self.buckets is None:
            return super().dropped_per_epoch
        if not self.drop_last:
            return 0
        sizes = np.bincount(self.bucket_of, minlength=len(self.buckets))  # type: ignore[arg-type]
        return int(sum(int(s) % self.global_batch for s in sizes))

    def state_dict(self) -> dict[str, Any]:
        """The cursor; bucketed, with a digest of every image's bucket, which the epoch's plan (and so what
        the saved batch number means) depends on. In the state, not the fingerprint: states saved before
        it was kept still resume."""
        state = super().state_dict()
        if self._bucket_digest is not None:
            state["buckets"] = self._bucket_digest
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buckets is None:
            super().load_state_dict(state)
            return
        if state.get("buckets", self._bucket_digest) != self._bucket_digest:
            raise PrepError(
                "the images' sizes put some of them in other buckets than when the state was saved, so the "
                "saved batch would point into another plan of the epoch",
                self.path or "LocalDataset",
                "resume with the images that saved the state, or start the loader fresh")
        pos = int(state["position"])
        if not 0 <= pos <= self.batches_per_epoch():
            raise PrepError(
                f"saved batch {pos} is outside an epoch of {self.batches_per_epoch()} batches",
                self.path or "LocalDataset",
                "resume with the dataset that saved the state",
            )
        self.epoch, self.pos = int(state["epoch"]), pos

    def fingerprint(self) -> dict[str, Any]:
        listing = json.dumps([self.keys, [len(c) for c in self.captions]]).encode()
        return {
            "type": "LocalDataset",
            "images": hashlib.sha256(listing).hexdigest()[:16],
            "samples": self.total,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "buckets": self.buckets,
        }

    # ------------------------------------------------------------------------------------- loading
    def _parsed(
        self, refs: Sequence[Any], keep_places: bool = False
    ) -> list[Parsed | None]:
        """(key, members, where, epoch) per reference; a vanished image is skipped (None with keep_places)."""
        out: list[Parsed | None] = []
        for r, epoch, _ in refs:
            path = self.folder / self.names[r]
            where = f"{path} ({self.captions_file}:{self.lines[r]})"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                skips.skip_or_raise(
                    BadSample("image disappeared after the dataset was opened", where,
                              "restore the image or rebuild the captions file", reason="missing file"),
                    self.on_error, self.keys[r])
                if keep_places:
                    out.append(None)
                continue
            except OSError as err:  # there, but not readable: an I/O error, not a bad sample
                raise unreadable(err, "image", where) from None
            members = {self.image_field: data, self.caption_field: self.captions[r].encode("utf-8")}
            out.append((self.keys[r], members, where, epoch))
        return out

    def _decoder(self, refs: Sequence[Any]) -> Decoder:
        """The decoder of these references' bucket (a planned batch holds one; without buckets, the one)."""
        return self.decoders[refs[0][2]] if refs else self.decoders[0]

    def load_batch(self, refs: Sequence[Any]) -> Any:
        return self._decoder(refs).decode_batch(self._parsed(refs), self.transform, self.collate)

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any] | None]:
        """Samples of one batch, as a per-sample map above loads them (bucketed ones cannot be mixed)."""
        with skips.leaf(self.path):
            return self._decoder(refs).finish_all(self._parsed(refs, True), self.transform)


def text_line_of(data: bytes, offset: int) -> int:
    """1-based line number of a byte offset (to point at an undecodable line)."""
    return data.count(b"\n", 0, offset) + 1
