"""The one rule for tar member names: which names are safe, which are samples, and how they split.

Every reader and writer of shards uses it: the scanner (`tar.iter_samples`), the writer
(`tar.member_name`), the bulk paths (`tar_bulk` and the C helper `_tarnative.c`, whose `plain_name`
implements `PLAIN_KEY "." PLAIN_EXT` and is tested against it) and the loader's in-memory member
parser (`loaders.decode.member_spans`). A shard the writer accepts therefore reads back as the same
samples everywhere (a property test holds them to it).

- WebDataset's key rule: the key runs up to the first dot of the base name, the extension is the rest.
- energon's metadata rule: `__name__` or anything under a top-level `__name__/` folder is not a sample
  (`dir/__x.jpg` and `__x.jpg` are ordinary samples).
- Names are never trusted as paths: absolute names, drives, `..` components and NULs are refused.
- Image extensions are canonical in lower case (`canonical_ext`): readers match members by exact name
  (energon's field_map, `fields=["jpg"]`, `file_ext_in_tar`), so a `photo.JPG` taken from a camera
  folder is written as `photo.jpg`. Other extensions keep their case (`KEY.VAE.npy` is what its
  encoder was named).
"""

from __future__ import annotations

import re

from prep.errors import PrepError

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")
_DRIVE_RE = re.compile(r"[A-Za-z]:[\\/]")  # a Windows drive: an absolute path there

# a sample key and a member extension that always make a safe member name reading back as (key, ext):
# relative, no `.`/`..` component, not metadata, no dot in the key's last part, no `/` in the ext. The
# bulk paths take only such names (in Python and in C) and leave every other name to the exact scanner.
PLAIN_KEY = r"(?!__)[\w-]+(?:/[\w-]+)*"
PLAIN_EXT = r"[\w.-]+"


_PLAIN_NAME = re.compile(rf"({PLAIN_KEY})\.({PLAIN_EXT})", re.ASCII)


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # image members, canonical names


def canonical_ext(ext: str) -> str:
    """The member extension a writer of prep's layout uses for `ext`: an image extension in any case in
    lower case (`JPG` -> `jpg`, `Jpeg` -> `jpeg`), any other extension as it is."""
    low = ext.lower()
    return low if low in IMAGE_EXTS else ext


class UnsafeMemberError(PrepError):
    """A member whose name or type could escape the output folder if extracted."""


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) by WebDataset's rule, or None when the base name has no extension."""
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2)


def is_meta_name(name: str) -> bool:
    """True for members that energon and WebDataset pass over as metadata (`__info__`, `__x__/...`)."""
    return _META_RE.match(name) is not None


def member_parts(name: str) -> tuple[str, str] | None:
    """(key, extension) of a checked member name that belongs to a sample; None for metadata members and
    names without an extension (readers pass over both)."""
    return None if is_meta_name(name) else split_key(name)


def read_member_name(name: str, where: str) -> tuple[str, str] | None:
    """`member_parts` of a name read from a tar, checked first (raises for an unsafe name). A plain name,
    nearly every one, is split by one regex match: it is safe, not metadata, and its key has no dot."""
    m = _PLAIN_NAME.fullmatch(name)
    if m is not None:
        return m.group(1), m.group(2)
    return member_parts(check_member_name(name, where))


def check_member_name(name: str, where: str) -> str:
    """Return the normalised name, or raise when it could address anything outside a folder."""
    while name.startswith("./"):
        name = name[2:]
    if not name or "\x00" in name:
        raise UnsafeMemberError(f"member name {name!r} is empty or holds a NUL byte", where,
                                "rewrite the tar with plain relative names")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise UnsafeMemberError(f"member {name!r} has an absolute path", where,
                                "rewrite the tar with relative member names")
    if ".." in name and ".." in name.replace("\\", "/").split("/"):
        raise UnsafeMemberError(f"member {name!r} has a '..' component", where,
                                "rewrite the tar without parent-directory references")
    return name


def member_name(key: str, ext: str, where: str) -> str:
    """`KEY.EXT`, refused unless a reader splits it back into exactly (key, ext) and it is a safe path.

    A dot in the key's base name, a `/` in the extension, or a metadata-like name would make WebDataset,
    energon and prep's readers see another sample than the one written.
    """
    name = f"{key}.{ext}"
    if not ext or check_member_name(name, where) != name or member_parts(name) != (key, ext):
        raise UnsafeMemberError(
            f"sample key {key!r} with extension {ext!r} does not make a member name that reads back as "
            "the same sample", where,
            "use keys without dots in their last path part, extensions without '/', and no '__x__' prefix")
    return name
