"""Typed errors. Their messages are one line: what (field or path), the value, and a hint."""

from __future__ import annotations


class DnadError(Exception):
    """Base of every error this library raises on purpose."""


class InputError(DnadError):
    """Bad user input (config value, path, dataset): the CLI prints it and exits with code 2."""

    def __init__(self, where: str, value: object, hint: str):
        self.where, self.value, self.hint = where, value, hint
        super().__init__(f"{where}={value!r}: {hint}")

    def __reduce__(self) -> tuple:  # picklable, so it crosses Ray process boundaries intact
        return (type(self), (self.where, self.value, self.hint))


class DatasetNotFoundError(InputError):
    """A dataset's files are not where the config says."""


class DivergenceError(DnadError):
    """Too many consecutive non-finite steps; names the stage and the step."""

    def __init__(self, stage: str, step: int, count: int, what: str):
        self.stage, self.step, self.count = stage, step, count
        super().__init__(
            f"{stage}: {count} consecutive non-finite steps up to step {step} ({what}); "
            "lower the learning rate or check the data"
        )
        self.what = what

    def __reduce__(self) -> tuple:
        return (type(self), (self.stage, self.step, self.count, self.what))


class CheckpointError(DnadError):
    """A checkpoint is missing, truncated, corrupt or unsafe."""
