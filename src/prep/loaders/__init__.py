"""Streaming loaders for prep shards: exact, O(1) resume; blends, mixes, concats, chunks."""

from prep.loaders.base import BatchDesc, Node, Source, counter_rng, dist_info, rank_slice
from prep.loaders.chunked import ChunkedDataLoader, ChunkedSampler, ChunkPlan, resolve_chunk_config
from prep.loaders.combinators.blend import BlendDataset
from prep.loaders.combinators.concat import ConcatDataset
from prep.loaders.combinators.epochize import EpochizeDataset
from prep.loaders.combinators.map import MapDataset
from prep.loaders.combinators.mix import MixBatchDataset, concat_pad, homogeneous_concat_mix
from prep.loaders.dataloader import DataLoader
from prep.loaders.io.collate import collate_samples
from prep.loaders.io.decode import Decoder
from prep.loaders.io.images import jpeg_backend
from prep.loaders.io.retry import RetryPolicy
from prep.loaders.latents import (
    LatentScaling,
    LatentTransform,
    sample_moments,
    scale_latents,
    split_moments,
    unscale_latents,
)
from prep.loaders.leaves.local import LocalDataset
from prep.loaders.leaves.sequence import SequenceDataset
from prep.loaders.leaves.shard import ShardDataset

__all__ = ["BatchDesc", "DataLoader", "Node", "counter_rng", "dist_info", "rank_slice"]
__all__ += ["Decoder", "LocalDataset", "RetryPolicy", "ShardDataset", "collate_samples", "jpeg_backend"]
__all__ += ["BlendDataset", "ChunkPlan", "ChunkedDataLoader", "ChunkedSampler", "ConcatDataset",
            "EpochizeDataset", "MapDataset", "MixBatchDataset", "SequenceDataset", "Source", "concat_pad",
            "homogeneous_concat_mix", "resolve_chunk_config"]
__all__ += ["LatentScaling", "LatentTransform", "sample_moments", "scale_latents", "split_moments",
            "unscale_latents"]
