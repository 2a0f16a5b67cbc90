"""The stream: the frame envelope, Kafka and Redis I/O (`kafka_io`, `redis_io`), commit offsets, frame sources and the
producer, the typed result records, and the inspection worker runtime (`pipeline.streaming.worker`)."""
