"""Demo helpers: a real container registry, images to push through it, and clients to pull."""
