"""Typed errors. The CLI prints `error: <message>` for any MergeError and exits non-zero;
any other exception escaping is a bug."""


class MergeError(Exception):
    """Base class: a problem with the user's input or request, explained in one line."""

    exit_code = 2


class UnknownFamily(MergeError):
    pass


class UnsupportedFormat(MergeError):
    pass


class ShapeMismatch(MergeError):
    pass


class UnmappedKeys(MergeError):
    exit_code = 3


class CodecError(MergeError):
    pass


class VerifyFailed(MergeError):
    exit_code = 4
