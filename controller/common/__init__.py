"""Plumbing every stage uses: errors, atomic files, tool versions, progress display, yielding to a local agent."""
