"""Evaluation farm: dispatching jobs to agents over gRPC."""
