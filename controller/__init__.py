"""The tuneqn controller: analysis, candidates, dispatch, reports."""
