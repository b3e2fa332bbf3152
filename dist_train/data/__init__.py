"""Reading shards into batches: the stream, augmentation, fundus transforms."""
