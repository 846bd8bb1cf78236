"""Drop-in attention for model libraries: each module imports its library only when used."""
