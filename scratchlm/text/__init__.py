"""The bottom of the pipeline: reading text files of any encoding (`reading`) and the corpus
every machine has offline, CPython's own documentation and docstrings (`embedded`). Every
stage above may use it; it uses nothing of scratchlm but the error types."""
