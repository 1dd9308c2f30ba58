"""dcmdp rollout workers and their inference engines."""
