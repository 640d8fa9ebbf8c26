"""ImageFolder: the list of image files under a root folder, and cheap header checks.

Any nesting depth is accepted. Labels are the index of the top-level subfolder (sorted names) when
images live in subfolders, and -1 for images that lie directly in the root. DINO needs no labels; they
are kept for k-NN / linear evaluation.
"""
from __future__ import annotations

import logging
import os
import struct

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
log = logging.getLogger("fastdino")


class DataError(RuntimeError):
    """A data problem the user must fix (missing folder, too many unreadable files): one line that
    names the culprit."""


class ImageFolder:
    """`.samples`: list of (path, label), sorted by path; `.classes`: top-level subfolder names that
    hold images (sorted). Raises DataError when the folder is missing or holds no image."""

    def __init__(self, root: str):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise DataError(f"data folder '{self.root}' does not exist (set data.path, or data.generate_demo=true)")
        paths = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    paths.append(os.path.join(dirpath, name))
        if not paths:
            raise DataError(f"data folder '{self.root}' holds no .jpg/.jpeg/.png image")
        paths.sort()
        top = [os.path.relpath(p, self.root).split(os.sep) for p in paths]
        self.classes = sorted({parts[0] for parts in top if len(parts) > 1})
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, index[parts[0]] if len(parts) > 1 else -1) for p, parts in zip(paths, top)]

    def __len__(self) -> int:
        return len(self.samples)


class Unreadable:
    """The unreadable images a reader skipped: each distinct file is counted and named once in the
    log, the first `name_at_most` of them; past that one line says further ones are only counted.
    Every reader of images uses one (training loaders, online k-NN, evaluation)."""

    def __init__(self, what: str, name_at_most: int = 10):
        self.what, self.name_at_most = what, name_at_most
        self.names: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, reason: str = "") -> None:
        if name in self.names:
            return
        self.names.add(name)
        if len(self.names) <= self.name_at_most:
            log.warning("%s: skipped unreadable image '%s'%s", self.what, name, f" ({reason})" if reason else "")
            if len(self.names) == self.name_at_most:
                log.warning("%s: further unreadable images are skipped and counted, not named", self.what)


def image_size_from_header(data: bytes) -> tuple[int, int]:
    """(width, height) read from a JPEG or PNG header, without decoding.

    Raises ValueError for anything that is not a complete JPEG (SOI ... SOFn ... EOI) or PNG
    (signature + IHDR): the cheap validity check used where the decoder cannot skip bad files (DALI).
    A truncated JPEG lacks its EOI marker and is rejected here."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise ValueError("PNG without IHDR")
        w, h = struct.unpack(">II", data[16:24])
        if w == 0 or h == 0:
            raise ValueError("PNG of size 0")
        return w, h
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG or PNG file")
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError("truncated JPEG (no end-of-image marker)")
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError("bad JPEG marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                break
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            if w == 0 or h == 0:
                raise ValueError("JPEG of size 0")
            return w, h
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ValueError("JPEG without a frame header")


class ImageSource:
    """Encoded images addressed by dataset index, from one of:
      - a folder of images (ImageFolder: any nesting),
      - a file list: a .txt file with one `path [label]` per line (relative paths are relative to
        the list's folder),
      - webdataset tar shards: a .tar file, a folder holding .tar files, or a glob ('shards/*.tar');
        every .jpg/.jpeg/.png member is one sample, label from a sibling .cls member when present.
    `read(i)` returns the raw bytes of sample i; `name(i)` a printable name (path or tar:member).
    Tar members are indexed once (offset, size) and read with one seek: no tar parsing per sample."""

    def __init__(self, path: str):
        import glob

        self.path = str(path)
        self._files: list[str] = []  # per sample: file path (folder/list) or tar path
        self._offsets: list[tuple[int, int]] | None = None
        self.labels: list[int] = []
        self._names: list[str] = []
        top = os.listdir(self.path) if os.path.isdir(self.path) else []
        if any(f.endswith(".tar") for f in top) and not any(
                f.lower().endswith(IMAGE_EXTENSIONS) or os.path.isdir(os.path.join(self.path, f)) for f in top):
            self._index_tars(sorted(os.path.join(self.path, f) for f in top if f.endswith(".tar")))
        elif os.path.isdir(self.path):
            folder = ImageFolder(self.path)
            self._files = [p for p, _ in folder.samples]
            self.labels = [l for _, l in folder.samples]
            self._names = self._files
        elif self.path.endswith(".tar") or any(ch in self.path for ch in "*?["):
            shards = sorted(glob.glob(self.path))
            if not shards:
                raise DataError(f"data shards '{self.path}' match no file")
            self._index_tars(shards)
        elif os.path.isfile(self.path):
            self._read_list(self.path)
        else:
            raise DataError(f"data folder '{self.path}' does not exist (set data.path, or data.generate_demo=true)")
        if not self._files:
            raise DataError(f"data source '{self.path}' holds no .jpg/.jpeg/.png image")

    def _read_list(self, list_path: str) -> None:
        base = os.path.dirname(os.path.abspath(list_path))
        with open(list_path) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                p = parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0])
                try:
                    label = int(parts[1]) if len(parts) > 1 else -1
                except ValueError:
                    raise DataError(f"file list '{list_path}' line {n}: label {parts[1]!r} is not an integer")
                self._files.append(p)
                self.labels.append(label)
        self._names = self._files

    def _index_tars(self, shards: list[str]) -> None:
        import tarfile

        self._offsets = []
        for shard in shards:
            labels = {}
            try:
                with tarfile.open(shard) as tf:
                    members = [m for m in tf.getmembers() if m.isfile()]
                    for m in members:  # webdataset: key.cls holds the label of key.jpg
                        if m.name.endswith(".cls"):
                            try:
                                labels[m.name[:-4]] = int(tf.extractfile(m).read().strip())
                            except ValueError:
                                pass
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"data shard '{shard}' cannot be read as a tar file ({e})")
            for m in members:
                if m.name.lower().endswith(IMAGE_EXTENSIONS):
                    self._files.append(shard)
                    self._offsets.append((m.offset_data, m.size))
                    self.labels.append(labels.get(m.name.rsplit(".", 1)[0], -1))
                    self._names.append(f"{shard}:{m.name}")

    def __len__(self) -> int:
        return len(self._files)

    def name(self, i: int) -> str:
        return self._names[i]

    def read(self, i: int) -> bytes:
        with open(self._files[i], "rb") as f:
            if self._offsets is None:
                return f.read()
            offset, size = self._offsets[i]
            f.seek(offset)
            return f.read(size)

