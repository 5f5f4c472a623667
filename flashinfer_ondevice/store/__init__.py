"""The flash store: a folder with a versioned JSON manifest and 4096-aligned data files.

`convert` writes one from any checkpoint; `open_store` validates one before any weight is
read; `DirectReader` reads from it with O_DIRECT.
"""
