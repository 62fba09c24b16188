import warnings

# paddle's cpp_extension warns about ccache on every import; it is noise for users of this tool.
warnings.filterwarnings("ignore", message="No ccache found")


class DataError(ValueError):
    """A user-facing problem with the data: missing folder, empty split, unreadable image, a
    resize/crop that cannot work."""
