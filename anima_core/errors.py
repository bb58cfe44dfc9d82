"""Errors a person can act on. The CLI prints their message, never a traceback."""


class AnimaError(Exception):
    """Base class: the message names the file, key or image and says what to do."""


class ModelFileError(AnimaError):
    """A model file is missing, truncated, of the wrong kind, or does not match the architecture."""


class TokenizerNotFoundError(AnimaError):
    """Tokenizer files could not be found at the given path or in the Hugging Face cache."""


class DatasetError(AnimaError):
    """The dataset config or its images and captions cannot be used."""


class ProfileError(AnimaError):
    """One or more problems in a profile; ``problems`` lists every one."""

    def __init__(self, path, problems):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s) in the profile:\n{lines}")
