"""The kadeploy driver: three macro-steps, variants with timeouts and retries, replay."""
