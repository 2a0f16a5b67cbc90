"""The services the pipeline talks to: the one way to connect to Redis (`redis_client`: URL, TLS, ACL user,
secrets registered for redaction, which errors are worth retrying)."""
