"""minisgl: the GPU worker of the minisgl serving engine, and its Python client."""
