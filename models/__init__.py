import warnings

# paddle's cpp_extension warns about ccache on every import; it is noise for users of this tool.
warnings.filterwarnings("ignore", message="No ccache found")
