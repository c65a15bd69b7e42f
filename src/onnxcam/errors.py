"""The one exception type users see; the CLI prints its message as a single line."""


class OnnxcamError(Exception):
    """A problem with the user's input (model, image, layer, target ...), explained in one line."""


class UnsupportedOpError(OnnxcamError):
    """An op on the path from the score to the layer has no gradient rule."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
