"""The scheduler's HTTP API (serve --http-port): OpenAI-compatible endpoints, metrics, the playground page."""
