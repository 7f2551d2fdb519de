"""eclip: entity-centric image-text matching (EntityCLIP, SIGIR 2025).

Importing the package is cheap: torch and open_clip load only when a model is
built, so ``eclip --help`` stays fast.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "Record"]


def __getattr__(name):
    # Lazy exports keep `import eclip` free of torch.
    if name == "load_model":
        from eclip.model.factory import load_model
        return load_model
    if name == "Record":
        from eclip.data.records import Record
        return Record
    raise AttributeError(name)
