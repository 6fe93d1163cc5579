"""Training services with Tinker's client API: the in-process `local` one and hosted Tinker.

`protocol` is the seam the rest of claas is written against; `local` and `tinker` implement it.
"""
