"""uniattn inside model libraries (Hugging Face transformers, Flax, Keras).

Each submodule plugs uniattn into one library through the seam that library offers for
attention. Importing this package imports no library; a submodule imports its library only
when it is used.
"""
