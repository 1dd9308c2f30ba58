"""Rollout engines behind the core RolloutEngine protocol."""
