"""The embed job on Ray Data: reader, mapper and writer callables over one Arrow row per shard, wired by the runner."""
