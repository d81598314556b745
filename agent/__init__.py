"""The tuneqn agent daemon that runs candidates next to a device."""
