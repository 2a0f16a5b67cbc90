"""What a running process tells the people who watch it: Prometheus series and the health endpoints of a worker
(`telemetry`), log lines as text or JSON with line and frame ids (`log_format`), and the one place secrets are
kept out of both (`redaction`)."""
