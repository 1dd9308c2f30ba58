"""dcmdp trainer: the DC-GRPO learner, in-process runner and gRPC trainer server."""
