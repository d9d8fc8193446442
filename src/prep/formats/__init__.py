"""Data at rest, and nothing else: shards (tar), `.idx`, `manifest.json`, `wdinfo.pkl`, `.nv-meta/`.

No torch here: everything that reads or writes these formats goes through this package.
"""

from prep.formats.checksum import file_checksum
from prep.formats.index import index_path, read_index, write_index
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.formats.names import UnsafeMemberError, split_key
from prep.formats.nvmeta import write_nv_meta
from prep.formats.tar import Member, Sample, TarFormatError, iter_samples, scan_tar
from prep.formats.tar_write import FileSlice, ShardInfo, write_shard
from prep.formats.wdinfo import read_wdinfo, write_wdinfo

__all__ = [
    "FileSlice", "Manifest", "Member", "Sample", "ShardEntry", "ShardInfo", "TarFormatError",
    "UnsafeMemberError", "file_checksum", "index_path", "iter_samples", "read_index", "read_manifest",
    "read_wdinfo", "scan_tar", "split_key", "write_index", "write_manifest", "write_nv_meta",
    "write_shard", "write_wdinfo",
]
