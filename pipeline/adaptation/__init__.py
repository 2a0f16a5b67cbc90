"""Learning from a line's own frames: the token buffer with admission, buffered training and its gate,
adapter files, the Redis registry of versions, and the per-worker service that serves and refreshes them."""
