"""`anoclip serve`: the HTTP inspection API (POST an image, get a verdict), batched onto the model."""
