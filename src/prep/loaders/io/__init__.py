"""What workers do: read shard bytes, parse members, decode, collate into shared memory."""
