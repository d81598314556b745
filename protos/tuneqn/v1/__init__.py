"""Generated gRPC contract ``tuneqn.v1`` (see agent.proto)."""
