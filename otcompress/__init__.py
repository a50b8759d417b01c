"""otcompress: compress transformers by heterogeneous Optimal-Transport fusion."""
from otcompress.errors import OTCompressError

__version__ = "0.1.0"

__all__ = ["fuse", "fuse_to_disk", "vanilla_fuse", "OTCompressError", "__version__"]


def __getattr__(name):
    # Lazy: `import otcompress` stays cheap for the CLI's --help.
    if name in ("fuse", "fuse_to_disk", "vanilla_fuse"):
        from otcompress import fusion as _fuse_module
        return getattr(_fuse_module, name)
    raise AttributeError(name)
