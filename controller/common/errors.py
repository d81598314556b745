"""Errors that the command line turns into one-line messages and exit codes."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, model file, dataset, flags): exit code 2."""

    exit_code = 2


class StudyFailed(Exception):
    """The study could not be completed for a reason other than bad input: exit code 1."""

    exit_code = 1
