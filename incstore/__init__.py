"""incstore: a content-addressed, incremental cache of Guix and Nix store items for CI.

The package is a library first: each verb module (`save`, `restore`) exposes a `plan_*` function
that returns pure data and an `execute_*` function that carries the plan out. `cli` is the thin
click front end.
"""

__version__ = "0.1.0"
